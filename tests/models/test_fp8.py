"""model.fp8 (sdtrain/models/fp8.py): the U-Net's linear layers run torchao's FP8 matmuls, checked
against an FP8 matmul written out here from the recipe's definition, and a run trains with them."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from sdtrain.demo.tiny import build_parts
from sdtrain.models import fp8
from sdtrain.training.module import StableDiffusionModule

pytest.importorskip("torchao.float8", reason="model.fp8 needs torchao (the fp8 extra, in dev)")
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantized(t: torch.Tensor) -> torch.Tensor:
    """`t` as the tensorwise recipe's e4m3 sees it: scaled so its largest magnitude is 448, cast,
    and scaled back (in fp32)."""
    scale = E4M3_MAX / t.abs().max().float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() / scale


def test_tensorwise_linear_equals_an_fp8_matmul_written_out():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 96))
    x = torch.randn(8, 64)
    with torch.no_grad():
        exact = plain(x)
    fp8.convert(plain, "tensorwise")
    assert type(plain[0]).__name__ == "Float8Linear"
    w, b = plain[0].weight, plain[0].bias
    with torch.no_grad():
        got = plain(x)
        want = quantized(x) @ quantized(w).T + b
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    error = ((got - exact).norm() / exact.norm()).item()
    assert 1e-4 < error < 0.1, error  # FP8 really ran: not the exact matmul, and close to it


def test_convert_takes_only_wide_enough_linears_and_keeps_parameter_names():
    unet = build_parts(32).unet
    before = {n: p.shape for n, p in unet.named_parameters()}
    want = [n for n, m in unet.named_modules() if fp8.eligible(n, m, 32)]
    small = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n not in want]
    assert (
        want
        and "time_embedding.linear_1" in small
        and "down_blocks.0.resnets.0.time_emb_proj" in small
    )
    assert fp8.convert(unet, "rowwise") == len(want)
    kinds = {n: type(m).__name__ for n, m in unet.named_modules()}
    assert all(kinds[n] == "Float8Linear" for n in want)
    assert all(kinds[n] == "Linear" for n in small)  # per-sample embeddings stay as they were
    assert {n: p.shape for n, p in unet.named_parameters()} == before  # checkpoints, EMA, exports


def test_a_module_with_fp8_trains_and_its_state_dict_loads_into_a_plain_unet():
    torch.manual_seed(0)
    parts = build_parts(32)
    module = StableDiffusionModule(
        parts, optimizer=partial(torch.optim.AdamW, lr=1e-3), fp8="tensorwise"
    )
    module.configure_model()
    assert any(type(m).__name__ == "Float8Linear" for m in module.unet.modules())
    opt = torch.optim.AdamW(module.unet.parameters(), lr=1e-3)
    x, t, c = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randn(4, 77, 32)
    target = torch.randn(4, 4, 8, 8)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(module(x, t, c), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0], losses
    plain = build_parts(32).unet
    plain.load_state_dict(module.unet.state_dict())  # strict: the same keys and shapes


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="model.fp8='fp4'"):
        fp8.check("fp4", lora=False)
    with pytest.raises(ValueError, match="model.fp8 with model.lora"):
        fp8.check("tensorwise", lora=True)
    with pytest.raises(ValueError, match="trainer=fsdp"):
        fp8.check("tensorwise", lora=False, fsdp=True)
    with pytest.raises(ValueError, match="model.fp8='e5m2'"):
        StableDiffusionModule(build_parts(32), optimizer=partial(torch.optim.AdamW), fp8="e5m2")
