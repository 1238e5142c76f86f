"""The LoRA family's tensors as files store them: each adapter's scale folded in, and kohya-ss' /
LyCORIS' key layout, what AUTOMATIC1111 and ComfyUI read for each type.

kohya / LyCORIS keys name a module `lora_unet_<path with _ for .>` (`lora_te_` for SD's text
encoder, `lora_te1_` / `lora_te2_` for SDXL's) and then the tensor (ComfyUI's
`comfy/weight_adapter/{lora,loha,lokr}.py` read these names):

| type          | tensors of a module                                             |
| ------------- | --------------------------------------------------------------- |
| LoRA / LoCon  | `lora_down.weight` (r, in[, k, k]), `lora_up.weight` (out, r[, 1, 1]), `alpha` |
| + DoRA        | `dora_scale`: the magnitude m, (out, 1) or (out, 1, 1, 1)       |
| LoHa          | `hada_w1_a` (out, r), `hada_w1_b` (r, in * k * k), `hada_w2_a`, `hada_w2_b`, `alpha`; with `use_effective_conv2d` `hada_t1` / `hada_t2` (r, r, k, k) and `hada_w*_a` (r, out), `hada_w*_b` (r, in) |
| LoKr          | `lokr_w1` (or `lokr_w1_a` @ `lokr_w1_b`), `lokr_w2` (or `lokr_w2_a` @ `lokr_w2_b`, with `lokr_t2`), `alpha` |

peft trains exactly these tensors with these shapes (its LoHa / LoKr follow LyCORIS), so only the
names change. Readers scale each update by alpha / r (r: `lora_down`'s, `hada_w1_b`'s or a LoKr
`_b` factor's first dimension; a LoKr of two full factors is not scaled); peft's alpha / r is
folded into one factor (`lora_up`, `hada_w1_a`, `lokr_w1` / `lokr_w1_a`) and alpha = r written,
so every reader applies the trained update whatever it makes of alpha.

DoRA's magnitude is per output row, as peft and the paper have it (W' = m * (W + dW) / ||W + dW||,
rows): its `dora_scale` is (out, 1), which ComfyUI reads by its shape as output-axis DoRA. LyCORIS'
own DoRA (and AUTOMATIC1111's reader) normalise per input column, a (1, in) `dora_scale`: a
different decomposition that an output-axis magnitude cannot be turned into.
"""

from __future__ import annotations

import torch

# peft's tensor names -> kohya / LyCORIS'; the LoHa / LoKr ones are the same
SUFFIXES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    **{n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
    "lokr_t2": "lokr_t2",
    "alpha": "alpha",  # kohya's alone: `scaled_weights`' second dict
}
# where each type's scale goes: the first of these a module has
SCALED = ("lora_B.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")


def split(key: str) -> tuple[str, str]:
    """`down_blocks.1.attentions.0.proj_in.lora_A.weight` -> (module path, peft tensor name)."""
    for suffix in SUFFIXES:
        if key.endswith(f".{suffix}"):
            return key[: -len(suffix) - 1], suffix
    raise KeyError(f"{key}: not a tensor of a LoRA, LoHa or LoKr adapter")


def scaled_weights(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """peft's adapter tensors of `model` (names without the adapter's: `...to_q.lora_A.weight`)
    with each module's scale (alpha / r) folded into its first factor; and kohya's `alpha` of each
    module (`...to_q.alpha`): its rank, the scale being folded in (float32, as kohya-ss writes
    it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    alphas = {}
    for path, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or "default" not in module.r:
            continue
        alphas[f"{path}.alpha"] = torch.tensor(float(module.r["default"]))
        key = next(f"{path}.{s}" for s in SCALED if f"{path}.{s}" in state)
        state[key] = state[key] * module.scaling["default"]
    return {k: v.contiguous() for k, v in state.items()}, alphas


def kohya_names(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """peft's names -> kohya's (`prefix` + the module path with `_`, then kohya's tensor name);
    DoRA's magnitude reshaped to (out, 1[, 1, 1]), a column against the weight's rows."""
    out = {}
    for key, value in state.items():
        path, suffix = split(key)
        if suffix == "lora_magnitude_vector":  # peft: (out,) for a Linear, (1, out, 1, 1) a conv
            value = value.reshape(-1, *[1] * (max(value.dim(), 2) - 1))
        out[f"{prefix}{path.replace('.', '_')}.{SUFFIXES[suffix]}"] = value.contiguous()
    return out
