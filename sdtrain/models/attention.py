"""Fused attention projections for the U-Net's training step (`model.fuse_projections`).

diffusers' `AttnProcessor2_0` runs three matmuls for a self-attention's q, k and v (and two for a
cross-attention's k and v) on the same input. `FusedProjections` concatenates those weights on
every call and runs one matmul: one larger GEMM instead of three narrow ones, and under bf16
autocast the concatenation is the cast autocast makes anyway. The parameters stay diffusers'
own `to_q`/`to_k`/`to_v`, so names, checkpoints, the EMA, LoRA export and sampling are unchanged
(diffusers' own `fuse_qkv_projections` makes a new `to_qkv` weight instead, which would then be
what trains).

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


class FusedProjections:
    """A diffusers attention processor: `AttnProcessor2_0` with q, k, v (self-attention) or k, v
    (cross-attention) computed by one matmul each; the same values, the same parameters."""

    def __init__(self):
        self.fallback = AttnProcessor2_0()

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
        if encoder_hidden_states is None:
            query, key, value = _linear([attn.to_q, attn.to_k, attn.to_v], hidden_states, 3, heads)
        else:
            (query,) = _linear([attn.to_q], hidden_states, 1, heads)
            key, value = _linear([attn.to_k, attn.to_v], encoder_hidden_states, 2, heads)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, tokens, -1).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def fuse_projections(unet: nn.Module) -> int:
    """Give every attention module of `unet` the fused processor; returns how many."""
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(FusedProjections())
            count += 1
    log.info("attention: fused q/k/v projections in %d attention modules", count)
    return count
