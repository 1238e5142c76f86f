"""Export a LoRA run's adapters as the two files LoRA users load (`sdtrain-export CKPT OUT --lora`).

- `OUT/pytorch_lora_weights.safetensors`: diffusers' layout (`unet.` / `text_encoder.` keys, SDXL's
  second encoder `text_encoder_2.`; `lora.down` / `lora.up`), written by the family's pipeline's
  `save_lora_weights` (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`) as diffusers'
  train_text_to_image_lora.py and train_text_to_image_lora_sdxl.py write it;
  `pipe.load_lora_weights(OUT)` reads it.
- `OUT/pytorch_lora_weights_kohya.safetensors`: kohya-ss' layout (`lora_unet_..._to_q.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_...` for SD's text encoder, `lora_te1_...` / `lora_te2_...`
  for SDXL's two), what AUTOMATIC1111, ComfyUI and `pipe.load_lora_weights(FILE)` read, made with
  diffusers' `convert_state_dict_to_kohya`. kohya-ss trains SD-1/2 on diffusers' U-Net and SDXL on
  generative-models' (sgm), so an SDXL file names the U-Net's modules as that one does
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `sgm_names`), and diffusers'
  loader maps them back (`_maybe_map_sgm_blocks_to_diffusers`).

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
# Families whose kohya-ss LoRA names the U-Net's modules as generative-models' U-Net does
SGM_FAMILIES = ("sdxl",)


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
    import diffusers
    from safetensors.torch import save_file

    from sdtrain.artifacts.export import checkpoint_parts

    out = check_folder(out, overwrite, EXPORTED, EXPORT)
    parts = checkpoint_parts(ckpt_path, ema, pretrained, single_file_config, fuse=False)
    if not lora.has_adapter(parts.unet):
        raise ValueError(
            f"{ckpt_path}: the run trained no LoRA (model.lora was null); export it without --lora"
        )
    family = parts.family
    unet = adapter_weights(parts.unet)
    text = text_adapter_weights(parts.text_encoder, family.text_encoders)
    layers = {f"{name}_lora_layers": to_diffusers(weights) for name, weights in text.items()}
    sgm = family.name in SGM_FAMILIES
    unet_kohya = sgm_names(unet, parts.unet.config) if sgm else unet
    pipeline = getattr(diffusers, family.pipeline_class)
    with new_folder(out) as tmp:
        pipeline.save_lora_weights(tmp, unet_lora_layers=to_diffusers(unet), **layers)
        save_file(to_kohya(unet_kohya, text, len(family.text_encoders)), tmp / KOHYA_NAME)
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
    """diffusers' names (`lora.down` / `lora.up`, as its training scripts save them) where it has
    them for every adapter, else peft's (`lora_A` / `lora_B`) for all: adapters beyond the
    attention projections (`conv1`, `proj_in`, ...) keep peft's names in the conversion, and
    diffusers' loader reads one naming per file (it dropped the attention adapters of a mix)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    if not state:
        return None
    converted = convert_state_dict_to_diffusers(state)
    mixed = any(".lora_A." in k or ".lora_B." in k for k in converted)
    return state if mixed else converted


def text_adapter_weights(
    text_encoder, components: tuple[str, ...]
) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapted text encoder's `adapter_weights`, keyed by its diffusers component
    (`text_encoder`, SDXL's `text_encoder_2`), its names under `text_model.`."""
    text = {}
    for model, component in zip(lora.encoders(text_encoder).values(), components, strict=True):
        if lora.has_adapter(model):
            weights = adapter_weights(model)
            if not hasattr(model, "text_model"):  # the name every reader knows
                weights = {f"{TEXT_MODEL}{k}": v for k, v in weights.items()}
            text[component] = weights
    return text


def sgm_names(unet: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers U-Net adapter names -> generative-models' (`down_blocks.1.attentions.0.…` ->
    `input_blocks.4.1.…` for SDXL's two layers per block), the table of the single-file export."""
    from sdtrain.models.single_file import UNET_PREFIX, unet_to_original

    return {k.removeprefix(UNET_PREFIX): v for k, v in unet_to_original(unet, config).items()}


def to_kohya(
    unet: dict[str, torch.Tensor],
    text: dict[str, dict[str, torch.Tensor]],
    text_encoders: int = 1,
) -> dict[str, torch.Tensor]:
    """kohya-ss keys from the U-Net's adapters and each text encoder's (keyed by component) of a
    family of `text_encoders` encoders: SD-1/2's one is `lora_te_`, SDXL's `lora_te1_` and
    `lora_te2_`."""
    from diffusers.utils import convert_state_dict_to_kohya

    state = {f"unet.{k}": v for k, v in unet.items()}
    for component, weights in text.items():
        state |= {f"{component}.{k}": v for k, v in weights.items()}
    kohya = convert_state_dict_to_kohya(state)
    if text_encoders == 1:
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    return {k: v.contiguous() for k, v in kohya.items()}
