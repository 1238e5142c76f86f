"""Export a LoRA-family run's adapters as the files their users load (`sdtrain-export CKPT OUT --lora`).

- `OUT/pytorch_lora_weights_kohya.safetensors`, every type (`model.lora.type` lora, locon, loha,
  lokr; `model.lora.dora`): kohya-ss' / LyCORIS' layout, what AUTOMATIC1111 and ComfyUI read
  (`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`, DoRA's `.dora_scale`, LoHa's
  `.hada_w1_a` ..., LoKr's `.lokr_w1` ...: `sdtrain.artifacts.lora_layouts`; `lora_te_...` for SD's
  text encoder, `lora_te1_...` / `lora_te2_...` for SDXL's two). kohya-ss trains SD-1/2 on
  diffusers' U-Net and SDXL on generative-models' (sgm), so an SDXL file names the U-Net's modules
  as that one does (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `sgm_names`).
  `pipe.load_lora_weights(FILE)` reads it for LoRA and LoCon (diffusers maps the sgm names back,
  `_maybe_map_sgm_blocks_to_diffusers`); it drops a `dora_scale` and reads no SD LoHa / LoKr.
- `OUT/pytorch_lora_weights.safetensors`, LoRA, LoCon and DoRA: diffusers' layout (`unet.` /
  `text_encoder.` keys, SDXL's second encoder `text_encoder_2.`; `lora.down` / `lora.up`, or
  peft's `lora_A` / `lora_B` / `lora_magnitude_vector` where diffusers' names leave some out),
  written by the family's pipeline's `save_lora_weights` (`StableDiffusionPipeline`,
  `StableDiffusionXLPipeline`) as diffusers' train_text_to_image_lora.py and
  train_text_to_image_lora_sdxl.py write it; `pipe.load_lora_weights(OUT)` reads it.

The adapters' scale alpha / rank is folded into one factor (LoRA's up weights) and the kohya file
says alpha = rank: diffusers' file has no place for alpha, so a reader gets the images the run
trained either way. EMA weights by default (`ema=False`: the raw ones).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.artifacts import lora_layouts as layouts
from sdtrain.artifacts.export import DIFFUSERS_NAME, KOHYA_NAME, folder_parts
from sdtrain.artifacts.outputs import new_folder
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
) -> tuple[Path, ...]:
    """Write the LoRA files of the checkpoint's run into the folder `out` (new or empty, or an
    earlier export's with `overwrite`: `sdtrain.artifacts.outputs`): diffusers' (LoRA, LoCon,
    DoRA) and kohya's (every type); return them."""
    import diffusers
    from safetensors.torch import save_file

    source = (ema, pretrained, single_file_config)
    out, parts = folder_parts(out, overwrite, ckpt_path, *source, fuse=False)
    if not lora.has_adapter(parts.unet):
        raise ValueError(
            f"{ckpt_path}: the run trained no LoRA (model.lora was null); export it without --lora"
        )
    family = parts.family
    unet, alphas = layouts.scaled_weights(parts.unet)
    text = text_adapter_weights(parts.text_encoder, family.text_encoders)
    kohya_unet = unet | alphas
    if family.name in SGM_FAMILIES:
        kohya_unet = sgm_names(kohya_unet, parts.unet.config)
    kohya_text = {name: weights | text_alphas for name, (weights, text_alphas) in text.items()}
    kohya = to_kohya(kohya_unet, kohya_text, len(family.text_encoders))
    written = (out / KOHYA_NAME,)
    with new_folder(out) as tmp:
        if diffusers_loads(parts.unet):
            layers = {f"{name}_lora_layers": for_transformers(w) for name, (w, _) in text.items()}
            pipeline = getattr(diffusers, family.pipeline_class)
            pipeline.save_lora_weights(tmp, unet_lora_layers=to_diffusers(unet), **layers)
            written = (out / DIFFUSERS_NAME, *written)
        save_file(kohya, tmp / KOHYA_NAME)
    return written


def diffusers_loads(unet) -> bool:
    """Whether diffusers' `load_lora_weights` reads this run's adapters from a file: LoRA, LoCon
    and DoRA (peft-named, `lora_magnitude_vector`) yes; LoHa and LoKr of SD / SDXL no (its
    LoKr conversions are other models')."""
    from peft import LoraConfig

    return isinstance(unet.peft_config["default"], LoraConfig)


def to_diffusers(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """diffusers' names (`lora.down` / `lora.up`, as its training scripts save them) where it has
    them for every adapter, else peft's (`lora_A` / `lora_B`) for all: adapters beyond the
    attention projections (`conv1`, `proj_in`, ...) keep peft's names in the conversion, and
    diffusers' loader reads one naming per file (it dropped the attention adapters of a mix).
    DoRA keeps peft's names too: diffusers' loader dropped a text encoder's magnitudes under its
    own."""
    from diffusers.utils import convert_state_dict_to_diffusers

    if not state:
        return None
    converted = convert_state_dict_to_diffusers(state)
    mixed = any(".lora_A." in k or ".lora_B." in k for k in converted)
    dora = any(k.endswith(".lora_magnitude_vector") for k in state)
    return state if mixed or dora else converted


def for_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A text encoder's `to_diffusers` tensors with DoRA's magnitudes named as transformers'
    `load_adapter` (which diffusers calls) looks them up, `….lora_magnitude_vector.weight`: under
    peft's saved name it left them at their initial values (transformers 5.25, peft 0.21)."""
    magnitude = ".lora_magnitude_vector"
    state = to_diffusers(state)
    return state and {(f"{k}.weight" if k.endswith(magnitude) else k): v for k, v in state.items()}


def text_adapter_weights(
    text_encoder, components: tuple[str, ...]
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Each adapted text encoder's `lora_layouts.scaled_weights` (tensors, kohya alphas), keyed by
    its diffusers component (`text_encoder`, SDXL's `text_encoder_2`), names under `text_model.`."""
    text = {}
    for model, component in zip(lora.encoders(text_encoder).values(), components, strict=True):
        if lora.has_adapter(model):
            pair = layouts.scaled_weights(model)
            if not hasattr(model, "text_model"):  # the name every reader knows
                pair = tuple({f"{TEXT_MODEL}{k}": v for k, v in d.items()} for d in pair)
            text[component] = pair
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
    """kohya-ss keys (`lora_layouts.kohya_names`) from the U-Net's adapters and each text
    encoder's (keyed by component) of a family of `text_encoders` encoders: SD-1/2's one is
    `lora_te_`, SDXL's `lora_te1_` and `lora_te2_`."""
    prefixes = {"text_encoder": "lora_te_" if text_encoders == 1 else "lora_te1_"}
    prefixes["text_encoder_2"] = "lora_te2_"
    kohya = layouts.kohya_names(unet, "lora_unet_")
    for component, weights in text.items():
        kohya |= layouts.kohya_names(weights, prefixes[component])
    return kohya
