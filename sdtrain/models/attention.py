"""The U-Net's attention processor for the training step: fused projections
(`model.fuse_projections`) and heads padded for the kernels (`model.attention_pad_heads`).

diffusers' `AttnProcessor2_0` runs three matmuls for a self-attention's q, k and v (and two for a
cross-attention's k and v) on the same input. `FusedProjections` concatenates those weights on
every call and runs one matmul: one larger GEMM instead of three narrow ones, and under bf16
autocast the concatenation is the cast autocast makes anyway. The parameters stay diffusers'
own `to_q`/`to_k`/`to_v`, so names, checkpoints, the EMA, LoRA export and sampling are unchanged
(diffusers' own `fuse_qkv_projections` makes a new `to_qkv` weight instead, which would then be
what trains).

Padded heads: SD-1.x's attention heads are 40 wide (80 and 160 further down), and the fused
attention kernels run narrow heads at a fraction of their peak (docs/benchmarks.md). With
`pad_heads=64` the q, k and v heads are zero-padded to the next multiple of 64 for the kernel
call, scaled by the true width's 1/sqrt(d), and the output's padding dropped: q.k and the
weighted sum of v are exactly those of the narrow heads (the padding adds zeros), so the values
and gradients are the same; only the kernel's tile shape changes.

It takes only the plain case SD's U-Nets use (3-D input, no mask, no group/spatial/q-k norms, no
residual or rescale, plain `nn.Linear` projections); anything else, a LoRA-wrapped projection
included, goes to diffusers' processor unchanged.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

log = logging.getLogger(__name__)


def _linear(layers: list[nn.Module], x: torch.Tensor, parts: int, heads: int):
    """One matmul for `layers` (plain Linears on the same input) -> `parts` views
    (batch, heads, tokens, head_dim)."""
    if len(layers) == 1:  # nothing to concatenate: no copy of the weight
        out = layers[0](x)
    else:
        weight = torch.cat([layer.weight for layer in layers])
        biases = [layer.bias for layer in layers]
        bias = None if biases[0] is None else torch.cat(biases)
        out = F.linear(x, weight, bias)
    b, s, _ = out.shape
    return [t.transpose(1, 2) for t in out.view(b, s, parts, heads, -1).unbind(2)]


def plain(attn: Attention, hidden_states: torch.Tensor, attention_mask) -> bool:
    """Whether `attn` is the plain case `FusedProjections` computes (else diffusers' processor)."""
    linears = (attn.to_q, attn.to_k, attn.to_v)
    return (
        hidden_states.ndim == 3
        and attention_mask is None
        and all(type(layer) is nn.Linear for layer in linears)
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.norm_cross
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
    )


def check_pad(pad_heads: int | None) -> None:
    if pad_heads is not None and (
        isinstance(pad_heads, bool) or not isinstance(pad_heads, int) or pad_heads <= 0
        or pad_heads % 8
    ):  # fmt: skip
        raise ValueError(
            f"model.attention_pad_heads={pad_heads!r}: give a positive multiple of 8 (e.g. 64), "
            "or null to leave the heads as they are"
        )


def padded_sdpa(query, key, value, pad_heads: int | None) -> torch.Tensor:
    """`scaled_dot_product_attention` of (batch, heads, tokens, d) inputs with d zero-padded up to
    a multiple of `pad_heads` inside the call; the result has width d again and equal values."""
    d = query.shape[-1]
    width = d if pad_heads is None else -(-d // pad_heads) * pad_heads
    if width == d or key.shape[-1] != d or value.shape[-1] != d:  # padded only as SD's: one width
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    q, k, v = (F.pad(t, (0, width - d)) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=d**-0.5)
    return out[..., :d]


class FusedProjections:
    """A diffusers attention processor: `AttnProcessor2_0` with q, k, v (self-attention) or k, v
    (cross-attention) computed by one matmul each (`fuse`; else one each), and the heads padded
    to a multiple of `pad_heads` for the kernel call; the same values, the same parameters."""

    def __init__(self, fuse: bool = True, pad_heads: int | None = None):
        check_pad(pad_heads)
        self.fallback = AttnProcessor2_0()
        self.fuse, self.pad_heads = fuse, pad_heads

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if args or kwargs or not plain(attn, hidden_states, attention_mask):
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        batch, tokens, _ = hidden_states.shape
        heads = attn.heads
        if encoder_hidden_states is None and self.fuse:
            query, key, value = _linear([attn.to_q, attn.to_k, attn.to_v], hidden_states, 3, heads)
        else:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            (query,) = _linear([attn.to_q], hidden_states, 1, heads)
            if self.fuse:
                key, value = _linear([attn.to_k, attn.to_v], context, 2, heads)
            else:
                (key,), (value,) = (
                    _linear([layer], context, 1, heads) for layer in (attn.to_k, attn.to_v)
                )
        out = padded_sdpa(query, key, value, self.pad_heads)
        out = out.transpose(1, 2).reshape(batch, tokens, -1).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def fuse_projections(unet: nn.Module, fuse: bool = True, pad_heads: int | None = None) -> int:
    """Give every attention module of `unet` the processor (fused projections, padded heads);
    returns how many."""
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(FusedProjections(fuse, pad_heads))
            count += 1
    what = ["fused q/k/v projections"] * fuse + [f"heads padded to x{pad_heads}"] * bool(pad_heads)
    log.info("attention: %s in %d attention modules", ", ".join(what), count)
    return count
