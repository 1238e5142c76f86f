"""Export a LoRA run's adapters as the two files LoRA users load (`sdtrain-export CKPT OUT --lora`).

- `OUT/pytorch_lora_weights.safetensors`: diffusers' layout (`unet.` / `text_encoder.` keys,
  `lora.down` / `lora.up`), written by `StableDiffusionPipeline.save_lora_weights` as diffusers'
  train_text_to_image_lora.py writes it; `pipe.load_lora_weights(OUT)` reads it.
- `OUT/pytorch_lora_weights_kohya.safetensors`: kohya-ss' layout (`lora_unet_..._to_q.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_...` for the text encoder), what AUTOMATIC1111, ComfyUI and
  `pipe.load_lora_weights(FILE)` read, made with diffusers' `convert_state_dict_to_kohya`.

The adapters' scale alpha / rank is folded into the up (B) weights and both files say alpha = rank:
diffusers' file has no place for alpha, so a reader gets the images the run trained either way.
EMA weights by default (`ema=False`: the raw ones).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.artifacts.export import DIFFUSERS_NAME, EXPORT, EXPORTED, KOHYA_NAME
from sdtrain.artifacts.outputs import check_folder, new_folder
from sdtrain.models import lora

TEXT_MODEL = "text_model."  # CLIPTextModel's inner module: transformers 5 flattened it away


def export_lora(
    ckpt_path: str | Path,
    out: str | Path,
    ema: bool = True,
    pretrained: str | Path | None = None,
    single_file_config: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the diffusers and kohya LoRA files of the checkpoint's run into the folder `out`
    (new or empty, or an earlier export's with `overwrite`: `sdtrain.artifacts.outputs`); return
    them."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from sdtrain.artifacts.export import checkpoint_parts

    out = check_folder(out, overwrite, EXPORTED, EXPORT)
    parts = checkpoint_parts(ckpt_path, ema, pretrained, single_file_config, fuse=False)
    if not lora.has_adapter(parts.unet):
        raise ValueError(
            f"{ckpt_path}: the run trained no LoRA (model.lora was null); export it without --lora"
        )
    unet = adapter_weights(parts.unet)
    text = None
    if lora.has_adapter(parts.text_encoder):
        text = adapter_weights(parts.text_encoder)
        if not hasattr(parts.text_encoder, "text_model"):  # the name every reader knows
            text = {f"{TEXT_MODEL}{k}": v for k, v in text.items()}
    with new_folder(out) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=to_diffusers(unet), text_encoder_lora_layers=to_diffusers(text)
        )
        save_file(to_kohya(unet, text), tmp / KOHYA_NAME)
    return out / DIFFUSERS_NAME, out / KOHYA_NAME


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """peft's adapter weights of `model` (`...to_q.lora_A.weight`), with alpha / rank folded
    into each B: the update B @ A then needs no scale."""
    from peft.utils import get_peft_model_state_dict

    cfg = model.peft_config["default"]
    scale = cfg.lora_alpha / cfg.r
    state = get_peft_model_state_dict(model)
    return {k: (v * scale if ".lora_B." in k else v).contiguous() for k, v in state.items()}


def to_diffusers(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(state) if state else None


def to_kohya(
    unet: dict[str, torch.Tensor], text: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """kohya-ss keys; SD-1/2 have one text encoder, whose kohya prefix is `lora_te_`."""
    from diffusers.utils import convert_state_dict_to_kohya

    state = {f"unet.{k}": v for k, v in unet.items()}
    state |= {f"text_encoder.{k}": v for k, v in (text or {}).items()}
    kohya = convert_state_dict_to_kohya(state)
    return {k.replace("lora_te1_", "lora_te_", 1): v.contiguous() for k, v in kohya.items()}
