"""The fast settings' switches (sdtrain/speed.py) and their wiring into the module."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from sdtrain import speed
from sdtrain.module import StableDiffusionModule
from sdtrain.tiny import build_parts


def compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize("mode", ["unet", "blocks"])
def test_compile_in_place_keeps_names_and_outputs(mode: str):
    unet = build_parts(32).unet.eval()
    names = [n for n, _ in unet.named_parameters()]
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=c).sample
    speed.compile_unet(unet, mode, backend="eager")  # dynamo tracing without inductor's C++ build
    assert [n for n, _ in unet.named_parameters()] == names  # checkpoints and EMA unchanged
    if mode == "unet":
        assert compiled(unet)
    else:
        assert not compiled(unet) and all(compiled(b) for b in unet.down_blocks)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=c).sample, want)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="model.compile='whole'"):
        speed.check("whole")
    with pytest.raises(ValueError, match="float32_matmul_precision='fast'"):
        speed.set_float32_matmul_precision("fast")


def test_module_applies_channels_last_and_compile():
    m = StableDiffusionModule(
        build_parts(32), optimizer=partial(torch.optim.AdamW), compile=None, channels_last=True
    )
    m.configure_model()
    conv = m.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    with pytest.raises(ValueError, match="model.compile"):
        StableDiffusionModule(build_parts(32), optimizer=partial(torch.optim.AdamW), compile="all")
