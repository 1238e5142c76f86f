"""sdtrain.models.attention: the fused-projection processor gives the U-Net diffusers' outputs and
gradients with the same parameters, and leaves what it does not compute to diffusers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from sdtrain.demo.tiny import build_unet
from sdtrain.models import attention
from tests.models.test_layout import _step  # one training step: outputs and gradients


def test_fused_projections_keep_outputs_gradients_and_parameters():
    torch.manual_seed(0)
    unet = build_unet(8).train()
    names = [n for n, _ in unet.named_parameters()]
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randn(2, 77, 32)
    want_out, want_grads = _step(unet, x, t, ctx)

    calls = []
    real = attention._linear

    def counting(layers, *args):
        calls.append(len(layers))
        return real(layers, *args)

    attention._linear = counting
    try:
        assert attention.fuse_projections(unet) == 14  # self- and cross-attention in 7 blocks
        got_out, got_grads = _step(unet, x, t, ctx)
    finally:
        attention._linear = real
    # each self-attention: one matmul for q, k, v; each cross-attention: q, then one for k and v
    assert sorted(calls) == [1] * 7 + [2] * 7 + [3] * 7, calls
    assert [n for n, _ in unet.named_parameters()] == names
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fuse", [False, True])
def test_padded_heads_keep_outputs_and_gradients(fuse, monkeypatch):
    """Heads zero-padded to 64 for the kernel call: the U-Net's outputs and gradients equal
    diffusers' own processor's, and the kernel really sees the padded width."""
    torch.manual_seed(0)
    unet = build_unet(8).train()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randn(2, 77, 32)
    want_out, want_grads = _step(unet, x, t, ctx)
    widths = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        widths.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert attention.fuse_projections(unet, fuse=fuse, pad_heads=64) == 14
    got_out, got_grads = _step(unet, x, t, ctx)
    assert widths and {w for w in widths} == {(64, 64, 64)}, widths
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_padded_sdpa_equals_the_narrow_heads_at_sd15_width():
    """At SD-1.5's 40-wide heads, in bf16 as trained, padding to 64 changes the result by no more
    than bf16 rounding (checked against the unpadded kernel's own result in fp32)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 64, 40, requires_grad=True) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    got = attention.padded_sdpa(q, k, v, 64)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    ref = torch.autograd.grad(want.square().sum(), (q, k, v))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    low = attention.padded_sdpa(*(t.detach().bfloat16() for t in (q, k, v)), 64).float()
    torch.testing.assert_close(low, want.detach(), rtol=2e-2, atol=2e-2)
    assert attention.padded_sdpa(q, k, v, 40) is not None  # a multiple already: no padding


@pytest.mark.parametrize("bad", [0, 12, -64, True, "64", 6.4])
def test_bad_pad_width_is_named(bad):
    with pytest.raises(ValueError, match="model.attention_pad_heads"):
        attention.check_pad(bad)


def test_cases_it_does_not_compute_go_to_diffusers():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, residual_connection=True)
    x = torch.randn(2, 5, 16)
    want = attn(x)
    attn.set_processor(attention.FusedProjections())
    assert not attention.plain(attn, x, None)
    torch.testing.assert_close(attn(x), want)
    # a projection wrapped by an adapter (not a plain Linear) must not be bypassed
    plain = Attention(16, heads=2, dim_head=8)
    plain.to_q = torch.nn.Sequential(plain.to_q)
    assert not attention.plain(plain, x, None)
    # an attention mask goes to diffusers too
    assert not attention.plain(Attention(16, heads=2, dim_head=8), x, torch.ones(2, 5))


def test_config_switch_reaches_a_real_run(tiny_model, shards, tmp_path):
    """`model.fuse_projections=true` from the Hydra config gives the U-Net the fused processor
    in a real Trainer run (and training runs through it)."""
    from sdtrain.cli.train import train
    from tests.conftest import compose_cfg, tiny_overrides

    seen, widths = [], set()
    real = attention.FusedProjections.__call__
    real_sdpa = attention.padded_sdpa

    def spy(self, attn, hidden_states, *args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return real(self, attn, hidden_states, *args, **kwargs)

    def sdpa_spy(q, k, v, pad_heads):
        out = real_sdpa(q, k, v, pad_heads)
        widths.add((q.shape[-1], pad_heads, out.shape[-1]))
        return out

    attention.FusedProjections.__call__ = spy
    attention.padded_sdpa = sdpa_spy
    try:
        overrides = tiny_overrides(tiny_model, shards) + ["debug=fast", "logger=none"]
        switches = ["model.fuse_projections=true", "model.attention_pad_heads=64"]
        assert train(compose_cfg(tmp_path, overrides + switches))
    finally:
        attention.FusedProjections.__call__ = real
        attention.padded_sdpa = real_sdpa
    assert any(seen), "the fused processor never ran in a training step"
    assert widths and all(p == 64 and w == o for w, p, o in widths), widths
