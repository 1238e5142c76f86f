"""sdtrain.models.attention: the fused-projection processor gives the U-Net diffusers' outputs and
gradients with the same parameters, and leaves what it does not compute to diffusers."""

from __future__ import annotations

import torch
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

    seen = []
    real = attention.FusedProjections.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return real(self, attn, hidden_states, *args, **kwargs)

    attention.FusedProjections.__call__ = spy
    try:
        overrides = tiny_overrides(tiny_model, shards) + ["debug=fast", "logger=none"]
        assert train(compose_cfg(tmp_path, overrides + ["model.fuse_projections=true"]))
    finally:
        attention.FusedProjections.__call__ = real
    assert any(seen), "the fused processor never ran in a training step"
