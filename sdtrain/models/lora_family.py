"""The LoRA family: which peft adapter `model.lora.type` builds, and the keys each type takes.

All four types are peft's own implementations (peft >= 0.21), so none needs LyCORIS:

| type    | peft config                       | update of a weight W (out, in[, k, k])                  |
| ------- | --------------------------------- | ------------------------------------------------------- |
| `lora`  | `LoraConfig`                      | dW = alpha / r * B @ A                                  |
| `locon` | `LoraConfig`, convolutions too    | as lora; a 3x3 conv's A is a 3x3 conv (r, in, 3, 3)     |
| `loha`  | `LoHaConfig` (FedPara)            | dW = alpha / r * (w1a @ w1b) * (w2a @ w2b) (Hadamard)   |
| `lokr`  | `LoKrConfig`                      | dW = alpha / r * kron(w1, w2), w1 / w2 full or a @ b    |

`model.lora.dora=true` (lora or locon) is DoRA (Liu et al. 2024) through `LoraConfig(use_dora=True)`:
W' = m * (W + dW) / ||W + dW||, the norm of each output row (peft's axis, the paper's), m trained
(one value per output channel). peft has DoRA for LoRA only, so LoHa / LoKr with DoRA (which LyCORIS
offers) is refused by name rather than trained through a second library.

LoCon is kohya-ss' / LyCORIS' name for LoRA on the U-Net's convolutions as well as its attention:
`conv_target_modules` (default `LOCON_TARGETS`: the ResNets' conv1 / conv2 / conv_shortcut and
time projection, the down- and up-samplers' conv, the transformer blocks' proj_in / proj_out and
feed-forward, what kohya's LoCon adapts) join `target_modules` on the U-Net; LoHa and LoKr take
`conv_target_modules` too (default none). A 3x3 conv's LoHa / LoKr factors are the flattened
(out, in * 9) matrix's unless `use_effective_conv2d=true` (LyCORIS' CP / Tucker layout, `hada_t1` /
`lokr_t2`).
"""

from __future__ import annotations

from typing import Any

import torch

TYPES = ("lora", "locon", "loha", "lokr")
LOCON_TARGETS = (
    *("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),  # transformer blocks beyond attention
    *("conv1", "conv2", "conv_shortcut", "time_emb_proj"),  # ResNets
    "conv",  # down- and up-samplers (`downsamplers.0.conv`): peft matches name suffixes
)
# each key of model.lora beyond rank, alpha, the target lists and text_encoder, with the value
# that means "off" (null means the type's default), and the types that take it
OPTIONS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "dropout": (0.0, ("lora", "locon")),
    "dora": (False, ("lora", "locon")),
    "conv_target_modules": ([], ("locon", "loha", "lokr")),
    "rank_dropout": (0.0, ("loha", "lokr")),
    "module_dropout": (0.0, ("loha", "lokr")),
    "use_effective_conv2d": (False, ("loha", "lokr")),
    "decompose_both": (False, ("lokr",)),
    "decompose_factor": (-1, ("lokr",)),
}
KEYS = ("type", *OPTIONS)
WHY = {
    "dora": "peft has DoRA for LoRA only (LoraConfig.use_dora): set type lora or locon",
    "dropout": "LoHa / LoKr have no input dropout: use rank_dropout or module_dropout",
    "conv_target_modules": "LoRA on convolutions is LoCon: set type locon",
}


def check(type: str = "lora", **options: Any) -> dict[str, Any]:
    """The options of `model.lora` for its `type`, with nulls left out; a ValueError naming the
    key and value for an unknown type or an option the type does not take."""
    if type not in TYPES:
        raise ValueError(f"model.lora.type={type!r}: takes one of {', '.join(TYPES)}")
    kept = {}
    for key, value in options.items():
        off, types = OPTIONS[key]
        if value is None:
            continue
        if type not in types and value != off:
            why = WHY.get(key, f"{key} is for type {' / '.join(types)}")
            raise ValueError(f"model.lora.{key}={value} with model.lora.type={type}: {why}")
        if type in types:
            kept[key] = list(value) if key == "conv_target_modules" else value
    if type == "locon":
        kept.setdefault("conv_target_modules", list(LOCON_TARGETS))
    return kept


def peft_config(type: str, rank: int, alpha: float, targets: list[str], **options: Any):
    """peft's config of the adapter `type` on the modules `targets` (LoRA's A Gaussian and B zero,
    LoHa's w2b zero, LoKr's w1 zero: every type starts as the base model)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    options = {k: v for k, v in options.items() if k != "conv_target_modules"}
    if type in ("lora", "locon"):
        return LoraConfig(
            r=int(rank),
            lora_alpha=float(alpha),
            lora_dropout=float(options.get("dropout", 0.0)),
            use_dora=bool(options.get("dora", False)),
            init_lora_weights="gaussian",
            target_modules=targets,
        )
    config = LoHaConfig if type == "loha" else LoKrConfig
    return config(r=int(rank), alpha=float(alpha), target_modules=targets, **options)


def describe(config, unet) -> dict[str, Any]:
    """`model.lora`'s type, rank, alpha and options as the peft `config` of `unet` says them (plain
    types, for the checkpoint's run metadata): `locon` where a LoRA adapts a 3x3 (or larger) conv."""
    from peft import LoHaConfig, LoKrConfig

    if isinstance(config, LoHaConfig | LoKrConfig):
        type = "loha" if isinstance(config, LoHaConfig) else "lokr"
        keys = [
            k for k, (_, types) in OPTIONS.items() if type in types and k != "conv_target_modules"
        ]
        out = {"type": type, "rank": int(config.r), "alpha": float(config.alpha)}
        return out | {k: getattr(config, k) for k in keys}
    return {
        "type": "locon" if adapts_a_conv(unet) else "lora",
        "rank": int(config.r),
        "alpha": float(config.lora_alpha),
        "dropout": float(config.lora_dropout),
        "dora": bool(config.use_dora),
    }


def adapts_a_conv(model) -> bool:
    """Whether an adapter of `model` sits on a convolution with a kernel larger than 1x1."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Conv2d) and base.kernel_size != (1, 1):
                return True
    return False
