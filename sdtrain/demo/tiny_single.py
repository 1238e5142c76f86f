"""Tiny SD-1.x- and SD-2.x-shaped models written as original-layout single files, for tests.

    python -m sdtrain.demo.tiny_single OUT [--flavour sd1|sd2]

Each writes `OUT/<flavour>.safetensors` (the layout AUTOMATIC1111 and ComfyUI load) and
`OUT/<flavour>-config/`, a diffusers-format folder holding only configs and the tokenizer (what
`model.single_file_config` points at). The dims are tiny; the layouts are the real ones:

- sd1: OpenAI CLIP text encoder (quick GELU, `cond_stage_model.transformer.*`), conv attention
  projections, one head size for all levels, epsilon prediction, PNDM sampler (as SD-1.5 ships).
- sd2: OpenCLIP text encoder (exact GELU, `cond_stage_model.model.*`, fused q/k/v), linear
  attention projections, a head count per level, v-prediction, DDIM sampler (as SD-2.1-v ships).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sdtrain.artifacts.folder import save_folder
from sdtrain.demo import tiny

FLAVOURS = ("sd1", "sd2")


def build_flavour(flavour: str, resolution: int = 32, seed: int = 0):
    """The tiny model's parts (`sdtrain.models.parts.Parts`) in SD-1.x or SD-2.x shape, random weights."""
    from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel

    from sdtrain.models.parts import Parts

    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r}; use one of {', '.join(FLAVOURS)}")
    sd2 = flavour == "sd2"
    torch.manual_seed(seed)
    tokenizer = tiny.build_tokenizer()
    text_encoder = tiny.build_text_encoder(tokenizer)
    if sd2:
        text_encoder.config.hidden_act = "gelu"  # OpenCLIP's activation (CLIP's is quick_gelu)
        text_encoder = type(text_encoder)(text_encoder.config)
    vae = tiny.build_vae(resolution)
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        # SD-2 gives a head count per level and linear projections; SD-1 one head count, convs.
        attention_head_dim=(2, 4, 4) if sd2 else 4,
        use_linear_projection=sd2,
        cross_attention_dim=text_encoder.config.hidden_size,
    )
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if sd2:
        scheduler = DDIMScheduler(
            prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, **common
        )
    else:
        scheduler = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    return Parts(unet, vae, text_encoder, tokenizer, scheduler)


def write_config_folder(parts, out: str | Path) -> Path:
    """A diffusers-format folder of `parts` with configs and tokenizer only (weights removed)."""
    from sdtrain.models.parts import assemble_pipeline

    pipe = assemble_pipeline(
        parts.vae, parts.text_encoder, parts.tokenizer, parts.unet, parts.noise_scheduler
    )
    out = Path(out)
    save_folder(pipe, out)
    tiny.write_bpe_files(out / "tokenizer")  # the slow CLIPTokenizer's files too
    for weights in out.glob("*/*.safetensors"):
        weights.unlink()
    return out


def make_tiny_single_file(out: str | Path, flavour: str = "sd1", seed: int = 0):
    """Write `<out>/<flavour>.safetensors` and `<out>/<flavour>-config/`; return both paths."""
    from sdtrain.models.single_file import save_single_file

    parts = build_flavour(flavour, seed=seed)
    out = Path(out)
    config = write_config_folder(parts, out / f"{flavour}-config")
    path = save_single_file(
        out / f"{flavour}.safetensors", parts.unet, parts.vae, parts.text_encoder, dtype="fp32"
    )
    return path, config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", help="folder to write into (created)")
    p.add_argument("--flavour", choices=FLAVOURS, default="sd1")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path, config = make_tiny_single_file(a.out, a.flavour, a.seed)
    print(f"wrote {path} (configs: {config})")


if __name__ == "__main__":
    main()
