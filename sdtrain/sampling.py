"""Text-to-image sampling with diffusers' pipeline over the training parts, and image grids."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw


def build_pipeline(vae, text_encoder, tokenizer, unet, train_scheduler, sampler: str = "ddim"):
    """A StableDiffusionPipeline sharing the given modules (no copies), with a sampling scheduler."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    from sdtrain.models import assemble_pipeline

    kinds = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpm++": DPMSolverMultistepScheduler,
    }
    if sampler not in kinds:
        raise ValueError(f"sampler {sampler!r} is not one of {sorted(kinds)}")
    scheduler = kinds[sampler].from_config(train_scheduler.config)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 5.0,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """One image per prompt; prompt i always uses seed + i, so grids compare across steps."""
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=gens,
        height=height,
        width=width,
        output_type="pil",
    )
    return out.images


def grid(
    images: list[Image.Image], captions: list[str] | None = None, cell: int = 128
) -> Image.Image:
    """Tile images (upscaled to at least `cell` px) in a near-square grid, captions under each."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    scale = max(1, cell // max(w, h))
    cw, ch = w * scale, h * scale
    text_h = 14 if captions else 0
    canvas = Image.new("RGB", (cols * cw, rows * (ch + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        x, y = (i % cols) * cw, (i // cols) * (ch + text_h)
        canvas.paste(img.resize((cw, ch), Image.Resampling.NEAREST), (x, y))
        if captions:
            draw.text((x + 2, y + ch + 1), captions[i][: cw // 6], fill="black")
    return canvas
