"""Random models with real Stable Diffusion shapes, for scripts/benchmark.py (nothing downloaded).

`build_shaped(family, out)` writes a diffusers folder: SD-1.5's U-Net (860 M), VAE and CLIP ViT-L/14;
or SDXL base's U-Net (2.57 B), its VAE config (scaling 0.13025, force_upcast) and both text
encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with its 1280-wide projection). The U-Net
configs are the released ones' (`unet/config.json` of stable-diffusion-v1-5 and
stable-diffusion-xl-base-1.0). `tiny=True` keeps the structure at toy widths (a CPU dry run of the
benchmark's code paths).
"""

from __future__ import annotations

from pathlib import Path

import torch

SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
TINY_SDXL_UNET = SDXL_UNET | dict(
    sample_size=32,
    block_out_channels=(32, 64, 64),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    norm_num_groups=16,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)


def clip_config(tok, width: int, layers: int, heads: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or width,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_vae(tiny: bool, scaling_factor: float, **extra):
    from diffusers import AutoencoderKL

    blocks = (16, 32) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        layers_per_block=1 if tiny else 2,
        norm_num_groups=8 if tiny else 32,
        latent_channels=4,
        scaling_factor=scaling_factor,
        **extra,
    )


def build_shaped(family: str, out: Path, tiny: bool = False) -> Path:
    """Write a random `family` ("sd" or "sdxl") model folder with the released shapes to `out`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdtrain.artifacts.folder import save_folder
    from sdtrain.demo.tiny import build_tokenizer
    from sdtrain.models.family import SD
    from sdtrain.models.sdxl import SDXL, TextEncoderPair, TokenizerPair

    tok = build_tokenizer()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 2.6 B weights: GPU
    with torch.device(device):
        if family == "sd":
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD-1.5 blocks
            text = CLIPTextModel(clip_config(tok, 768, 12, 12, "quick_gelu"))
            vae = build_vae(tiny, 0.18215)
            pipe = SD.pipeline(vae, text, tok, unet, sched)
        else:
            unet = UNet2DConditionModel(**(TINY_SDXL_UNET if tiny else SDXL_UNET))
            width2, layers2, heads2 = (32, 2, 4) if tiny else (1280, 32, 20)
            te1 = CLIPTextModel(
                clip_config(
                    tok, 32 if tiny else 768, 2 if tiny else 12, 4 if tiny else 12, "quick_gelu"
                )
            )
            te2 = CLIPTextModelWithProjection(clip_config(tok, width2, layers2, heads2, "gelu"))
            tok2 = build_tokenizer()
            tok2.pad_token = "!"
            vae = build_vae(tiny, 0.13025, force_upcast=True)
            pipe = SDXL.pipeline(
                vae, TextEncoderPair(te1, te2), TokenizerPair(tok, tok2), unet, sched
            )
    save_folder(pipe, out)
    return out
