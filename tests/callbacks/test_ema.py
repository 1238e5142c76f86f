"""EMA maths, weight swapping, and its state through a real checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdtrain.callbacks.ema import EMA, ema_decay


class Holder(nn.Module):
    """Stands where the LightningModule does: the EMA follows `.unet`."""

    def __init__(self):
        super().__init__()
        self.unet = nn.Linear(3, 2)


def test_decay_warmup_and_cap():
    assert ema_decay(0, 0.999, warmup=True) == pytest.approx(0.1)
    assert ema_decay(90, 0.999, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.999, warmup=True) == 0.999
    assert ema_decay(0, 0.999, warmup=False) == 0.999


def test_update_matches_the_formula_and_swap_restores():
    torch.manual_seed(0)
    m = Holder()
    ema = EMA(decay=0.9, warmup=False)
    ema.on_fit_start(None, m)
    w0 = m.unet.weight.detach().clone()
    with torch.no_grad():
        m.unet.weight.add_(1.0)
    ema.update(m.unet)
    assert torch.allclose(ema.shadow["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    raw = m.unet.weight.detach().clone()
    with ema.swapped_in(m.unet):
        assert torch.equal(m.unet.weight, ema.shadow["weight"])
    assert torch.equal(m.unet.weight, raw)
    assert ema.shadow["weight"].dtype == torch.float32


def test_converges_to_constant_weights():
    m = Holder()
    ema = EMA(decay=0.5, warmup=False)
    ema.on_fit_start(None, m)
    with torch.no_grad():
        m.unet.weight.fill_(3.0)
    for _ in range(40):
        ema.update(m.unet)
    assert torch.allclose(ema.shadow["weight"], torch.full_like(m.unet.weight, 3.0))


def test_state_dict_round_trip_and_mismatch():
    m = Holder()
    ema = EMA(decay=0.9)
    ema.on_fit_start(None, m)
    ema.update(m.unet)
    restored = EMA(decay=0.9)
    restored.load_state_dict(ema.state_dict())
    restored.on_fit_start(None, m)
    assert restored.num_updates == 1
    assert all(torch.equal(restored.shadow[k], ema.shadow[k]) for k in ema.shadow)
    other = Holder()
    other.unet = nn.Linear(3, 4, bias=False)
    with pytest.raises(KeyError, match="EMA"):
        _start(ema.state_dict(), other)


def _start(state, module):
    e = EMA()
    e.load_state_dict(state)
    e.on_fit_start(None, module)


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
