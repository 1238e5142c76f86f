"""Single-file SDXL checkpoints: Stability's original key layout (generative-models' `sgm`).

An SDXL `.safetensors` as ComfyUI, AUTOMATIC1111 and the model hubs trade it holds the U-Net under
`model.diffusion_model.*`, the VAE under `first_stage_model.*` (both named as for SD-1.x/2.x, the
U-Net's pooled-text + size/crop embedding as `label_emb.0.0` / `label_emb.0.2`), and the two text
encoders under `conditioner.embedders.0.transformer.*` (OpenAI CLIP ViT-L, transformers' names)
and `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG in its own names: fused q/k/v, and
`text_projection` as OpenCLIP applies it, x @ P, the transpose of transformers' Linear weight).

This module writes that layout from diffusers models (`to_original`, `save_single_file`) with the
SD module's tables (`sdtrain.models.single_file`), and reads it back into `Parts` through
diffusers' own converter (`StableDiffusionXLPipeline.from_single_file`) with a local
diffusers-format SDXL folder for configs and tokenizers (`load_single_file`), so nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.models.single_file import (
    check_config_folder,
    check_single_file,
    clip_to_original,
    openclip_names,
    read_pipeline,
    unet_to_original,
    vae_to_original,
    write_single_file,
)

CLIP_PREFIX = "conditioner.embedders.0.transformer."  # te1: CLIP ViT-L, transformers' names
OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # te2: OpenCLIP ViT-bigG, its own names
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the pipeline's, each read whole


def to_original(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The U-Net, VAE and the text encoder pair's (`TextEncoderPair`) weights under SDXL's
    original names (tensors shared, not copied; the projection transposed)."""
    out = unet_to_original(unet.state_dict(), dict(unet.config))
    out.update(vae_to_original(vae.state_dict(), dict(vae.config)))
    out.update(clip_to_original(text_encoder.te1.state_dict(), CLIP_PREFIX))
    # All of te2's layers: SDXL conditions on its penultimate hidden state *and* on the pooled
    # output of the last layer, so unlike SD-2 the file and diffusers' model hold the same ones.
    te2 = openclip_names(text_encoder.te2.state_dict())
    out.update({OPENCLIP_PREFIX + k: v for k, v in te2.items()})
    return out


def save_single_file(path: str | Path, unet, vae, text_encoder, dtype: str = "fp16") -> Path:
    """Write an SDXL (`text_encoder`: the pair) as one original-layout `.safetensors` at `path`.

    The VAE is written in `dtype` too, as SDXL checkpoints are: SDXL's VAE overflows when it
    *computes* in fp16, and loaders upcast it (its config's `force_upcast`); its weights fit.
    """
    return write_single_file(path, to_original(unet, vae, text_encoder), dtype)


def load_single_file(path: str | Path, config: str | Path | None, unet=None):
    """Parts of an SDXL from an original-layout `.safetensors`, configs and tokenizers from `config`.

    Args:
        path: the single file.
        config: a diffusers-format SDXL folder (model_index.json, unet/ vae/ text_encoder/
            text_encoder_2/ configs, tokenizer/ tokenizer_2/, scheduler/; its weights, if any,
            are not read).
        unet: a U-Net to use instead of the file's (a fresh one, for pretraining).

    Raises:
        KeyError: the file lacks weights the configs need (naming the file and the first one).
    """
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    from sdtrain.models.parts import Parts
    from sdtrain.models.sdxl import SDXL, TextEncoderPair, TokenizerPair

    path, config = check_single_file(path), check_config_folder(config, path, SDXL)
    pipe = read_pipeline(
        StableDiffusionXLPipeline, path, config, MODELS, unet, add_watermarker=False
    )
    text = TextEncoderPair(pipe.text_encoder, pipe.text_encoder_2)
    tokenizers = TokenizerPair(pipe.tokenizer, pipe.tokenizer_2)
    scheduler = DDPMScheduler.from_pretrained(config, subfolder="scheduler")
    return Parts(pipe.unet, pipe.vae, text, tokenizers, scheduler, str(path), family=SDXL)
