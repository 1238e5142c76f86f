"""A tiny random SDXL in the diffusers folder layout, made locally (`sdtrain-tiny-model --family sdxl`).

The folder (unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/
model_index.json) loads with `StableDiffusionXLPipeline.from_pretrained(OUT)` and through
sdtrain's loader, as a real SDXL folder does. It has what makes SDXL SDXL at toy sizes: two text
encoders (CLIP with quick GELU, then OpenCLIP-style with exact GELU and a projection), a context of
both penultimate hidden states concatenated, a U-Net with `addition_embed_type: text_time` (pooled
embedding + 6 size/crop ids), linear projections in its transformers and two transformer layers
in its deepest blocks, and an SDXL-style VAE config (`force_upcast`). The VAE gets the SD demo's
short autoencoder fit and a measured latent scale (SDXL's is 0.13025).
"""

from __future__ import annotations

import torch

from sdtrain.demo import tiny

TIME_EMBED = 8  # addition_time_embed_dim: each of the 6 size/crop ids gets 8 sinusoid features


def build_text_encoders(tokenizer, hidden: int = 32, hidden_2: int = 48):
    """(CLIPTextModel, CLIPTextModelWithProjection): SDXL's pair at toy widths, three layers each
    (the context is the penultimate layer's). The second is the wider, as in SDXL (768 and 1280):
    diffusers' single-file loader tells the two encoders' weights apart by their width."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(act: str, hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_attention_heads=4,
            num_hidden_layers=3,
            hidden_act=act,
            projection_dim=hidden,
            **tiny.token_fields(tokenizer),
        )

    te2 = CLIPTextModelWithProjection(config("gelu", hidden_2))
    return CLIPTextModel(config("quick_gelu", hidden)), te2


def build_unet(latent_size: int, context_dim: int, pooled_dim: int):
    """The SD demo's U-Net levels with SDXL's extra conditioning (`text_time`)."""
    return tiny.build_unet(
        latent_size,
        context_dim,
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + pooled_dim,
    )


def build_parts(resolution: int = 32, vae_steps: int = 0, seed: int = 0):
    """The tiny SDXL's parts in memory (`family` SDXL, text encoder and tokenizer as pairs)."""
    from sdtrain.models.parts import Parts
    from sdtrain.models.sdxl import SDXL, TextEncoderPair, TokenizerPair

    torch.manual_seed(seed)
    tok1, tok2 = tiny.build_tokenizer(), tiny.build_tokenizer()
    tok2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0), the first with its eos
    te1, te2 = build_text_encoders(tok1)
    vae = tiny.build_vae(resolution)
    vae.register_to_config(force_upcast=True)  # as SDXL's VAE config says
    if vae_steps:
        tiny.fit_vae(vae, resolution, vae_steps, seed=seed)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pair = TextEncoderPair(te1, te2)
    unet = build_unet(resolution // factor, pair.context_dim, pair.pooled_dim)
    tokenizers = TokenizerPair(tok1, tok2)
    return Parts(unet, vae, pair, tokenizers, tiny.build_scheduler(), family=SDXL)


def make_tiny_sdxl(out, resolution: int = 32, vae_steps: int = 300, seed: int = 0):
    """Write a tiny SDXL folder to `out` and return its path."""
    from pathlib import Path

    from sdtrain.artifacts.folder import save_folder
    from sdtrain.models.sdxl import SDXL

    p = build_parts(resolution, vae_steps, seed)
    pipe = SDXL.pipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, p.noise_scheduler)
    out = Path(out)
    save_folder(pipe, out)
    for sub in ("tokenizer", "tokenizer_2"):  # for transformers whose CLIPTokenizer is the slow one
        tiny.write_bpe_files(out / sub)
    return out
