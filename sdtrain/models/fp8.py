"""FP8 matmuls for the U-Net's linear layers (`model.fp8`), through torchao's float8 training.

torchao (PyTorch's own quantization library) over Transformer Engine: it swaps `nn.Linear` for
`Float8Linear` in place, so parameters, their names, checkpoints, the EMA and every export stay
as they are (the weights stay fp32 masters; only each matmul's inputs are cast), it composes with
`torch.compile` (which fuses the scaling and casts into neighbouring kernels) and FSDP2, and its
pure-PyTorch path runs on a CPU, so the tests train with it here. Transformer Engine needs its own
module classes (a rewrite of diffusers' attention and feed-forward blocks) and CUDA.

Recipes (torchao's names): "tensorwise" (one dynamic scale per tensor: the fastest) and "rowwise"
(one scale per row: closer to bf16). The forward casts activations and weights to e4m3, the
backward casts output gradients to e5m2. FP8 matmuls need an H100/H200-class GPU (compute
capability 8.9 or later) to be fast; elsewhere torch emulates them (what the CPU tests use).

Only linear layers over tokens whose both sides are multiples of 16 (FP8 GEMMs need it) and at
least `min_features` wide are converted: the U-Net's attention projections, feed-forward and
`proj_in`/`proj_out`. Convolutions and norms stay bf16, and so do the per-sample embedding layers
(time embedding, each ResNet's `time_emb_proj`, SDXL's `add_embedding`): their matmuls have one
row per sample, where casting costs more than FP8 saves.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

RECIPES = (None, "tensorwise", "rowwise")
PER_SAMPLE = ("time_embedding", "time_emb_proj", "add_embedding", "class_embedding")


def check(recipe: str | None, lora: bool, fsdp: bool = False) -> None:
    """Refuse what FP8 does not take, before anything is built."""
    if recipe not in RECIPES:
        raise ValueError(f"model.fp8={recipe!r} is not one of {list(RECIPES)}")
    if recipe is None:
        return
    if lora:
        raise ValueError(
            "model.fp8 with model.lora: peft's LoRA layers wrap the linear layers FP8 would "
            "replace; train LoRA in bf16 (model.fp8=null)"
        )
    if fsdp:
        raise ValueError("model.fp8 under trainer=fsdp is not supported yet: use trainer=ddp")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"model.fp8={recipe!r} needs torchao: pip install -e '.[fp8]' ({e})"
        ) from e


def eligible(name: str, module: nn.Module, min_features: int) -> bool:
    if not isinstance(module, nn.Linear) or any(part in PER_SAMPLE for part in name.split(".")):
        return False
    sizes = (module.in_features, module.out_features)
    return all(n % 16 == 0 and n >= min_features for n in sizes)


def convert(unet: nn.Module, recipe: str, min_features: int = 32) -> int:
    """Swap the eligible linear layers of `unet` for torchao's Float8Linear in place; returns how
    many were swapped."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = {name for name, m in unet.named_modules() if eligible(name, m, min_features)}
    if not chosen:
        raise ValueError(
            f"model.fp8={recipe!r}: no linear layer of the U-Net has both sizes a multiple of 16 "
            f"and at least {min_features}"
        )
    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(unet, config=config, module_filter_fn=lambda m, fqn: fqn in chosen)
    log.info("model.fp8=%s: %d linear layers of the U-Net run FP8 matmuls", recipe, len(chosen))
    return len(chosen)
