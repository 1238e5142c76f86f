"""The LoRA family's published formulas, written here apart from sdtrain and peft, to rebuild the
weights a kohya / LyCORIS file makes of a base model's (what AUTOMATIC1111 and ComfyUI compute):

- LoRA / LoCon: dW = alpha / r * up @ down (convolutions flattened to (out, in * k * k); r =
  down's first dimension)
- LoHa (FedPara, Hyeon-Woo et al. 2022): dW = alpha / r * (w1a @ w1b) * (w2a @ w2b), elementwise;
  with LyCORIS' CP layout each factor is t x_0 a x_1 b (t: (r, r, k, k)); r = w1b's first dimension
- LoKr (Kronecker product, LyCORIS): dW = s * kron(w1, w2), w1 = w1a @ w1b or full, likewise w2
  (or t2 in the CP layout); s = alpha / r with r a `_b` factor's first dimension, 1 when both
  factors are full
- DoRA (Liu et al. 2024): W' = m * (W + dW) / ||W + dW||, the norm of each output row; m stored as
  `dora_scale` (out, 1[, 1, 1])
"""

from __future__ import annotations

import torch


def tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP weight: core t (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("xykl,xo,yi->oikl", t, a, b)


def delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The update dW (shape `shape`) that the tensors `t` of one module (names after the module's:
    `lora_down.weight`, `hada_w1_a`, `lokr_w1`, `alpha`, ...) make, in float64."""
    t = {k: v.double() for k, v in t.items()}
    alpha = t["alpha"].item() if "alpha" in t else None
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        d = up.flatten(1) @ down.flatten(1)
        return d.reshape(shape) * alpha / down.shape[0]
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            w1 = tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return (w1 * w2).reshape(shape) * alpha / t["hada_w1_b"].shape[0]
    scale, factors = 1.0, []
    for i in (1, 2):
        if f"lokr_w{i}" in t:
            factors.append(t[f"lokr_w{i}"])
            continue
        a, b = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
        factors.append(tucker(t["lokr_t2"], a, b) if i == 2 and "lokr_t2" in t else a @ b)
        scale = alpha / b.shape[0]
    w1, w2 = factors
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape) * scale


def merged(weight: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight a reader makes of `weight` and one module's tensors `t` (float64)."""
    w = weight.double()
    new = w + delta(t, w.shape)
    if "dora_scale" in t:
        m = t["dora_scale"].double()
        assert m.shape == (w.shape[0],) + (1,) * (w.dim() - 1), m.shape  # one per output row
        norm = new.flatten(1).norm(dim=1).reshape(m.shape)
        new = m * new / norm
    return new


def by_module(file: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya file's tensors grouped by module name (`lora_unet_..._to_q`)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in file.items():
        module, name = key.split(".", 1)
        out.setdefault(module, {})[name] = value
    return out


def apply(
    model: torch.nn.Module, modules: dict[str, dict[str, torch.Tensor]], names: dict[str, str]
):
    """Replace the weight of each module of `model` that `modules` adapts (its kohya name mapped
    to the module's path by `names`) with the merged one, in place; a KeyError for a kohya name
    `names` lacks (a key no reader would place)."""
    found = dict(model.named_modules())
    with torch.no_grad():
        for kohya, tensors in modules.items():
            layer = found[names[kohya]]
            layer.weight.copy_(merged(layer.weight, tensors).to(layer.weight.dtype))
