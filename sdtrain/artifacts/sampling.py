"""Text-to-image sampling with diffusers' pipeline over the training parts, and image grids."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont

from sdtrain.models.family import SD, Family


def build_pipeline(
    vae, text_encoder, tokenizer, unet, train_scheduler, sampler: str = "ddim", family: Family = SD
):
    """The family's pipeline sharing the given modules (no copies), with a sampling scheduler."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    from sdtrain.models.parts import assemble_pipeline

    kinds = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpm++": DPMSolverMultistepScheduler,
    }
    if sampler not in kinds:
        raise ValueError(f"sampler {sampler!r} is not one of {sorted(kinds)}")
    scheduler = kinds[sampler].from_config(train_scheduler.config)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, family)
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
    seeds: list[int] | None = None,
) -> list[Image.Image]:
    """One image per prompt; prompt i uses seed + i (or seeds[i]), so grids compare across steps."""
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    if (height is None) != (width is None):  # diffusers drops a size given alone: default both
        size = pipe.unet.config.sample_size
        size = (size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor
        height, width = height or size, width or size
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


# Grids people can read: tiles of a tiny model (32 px) upscaled to TILE_PX, captions wrapped (never
# cut) under each tile, a label (the step) above the grid. Shared by the sampling callback and
# sdtrain-sample.
TILE_PX = 128
FONT_PX = 12
LINE_PX = 15  # FONT_PX plus leading
PAD = 4  # px between tiles and around text
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def font(size: int = FONT_PX) -> ImageFont.ImageFont:
    """Pillow's built-in font (a scalable one from Pillow 10.1; no font files needed)."""
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow 10.0: bitmap font only
        return ImageFont.load_default()


def wrap(text: str, width: int, fnt: ImageFont.ImageFont | None = None) -> list[str]:
    """`text` in lines no wider than `width` px, broken at spaces; a longer word is split.

    Nothing is cut: the lines hold every character of `text` but the breaking spaces.
    """
    fnt = fnt or font()
    lines: list[str] = []
    for word in text.split():
        if lines and fnt.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.extend(split_word(word, width, fnt))
    return lines or [""]


def split_word(word: str, width: int, fnt: ImageFont.ImageFont) -> list[str]:
    """`word` in pieces no wider than `width` px (at least one character each)."""
    pieces = []
    while len(word) > 1 and fnt.getlength(word) > width:
        cut = 1
        while cut < len(word) and fnt.getlength(word[: cut + 1]) <= width:
            cut += 1
        pieces.append(word[:cut])
        word = word[cut:]
    return [*pieces, word]


def upscaled_size(size: tuple[int, int], tile_px: int, resample: str) -> tuple[int, int]:
    """A tile's size: at least `tile_px` on its long side, never smaller than the image.

    Nearest upscales by a whole factor (every pixel becomes a square block); Lanczos to exactly
    `tile_px`.
    """
    w, h = size
    if max(w, h) >= tile_px:
        return w, h
    if resample == "nearest":
        f = math.ceil(tile_px / max(w, h))
        return w * f, h * f
    f = tile_px / max(w, h)
    return round(w * f), round(h * f)


def grid(
    images: list[Image.Image],
    captions: list[str] | None = None,
    tile_px: int = TILE_PX,
    label: str | None = None,
    resample: str = "nearest",
) -> Image.Image:
    """Tile images in a near-square grid: each upscaled to at least `tile_px`, its caption
    wrapped under it, `label` (e.g. "step 400") in a bar above.

    Args:
        images: the tiles, all one size.
        captions: one per image (None: no captions).
        tile_px: the smallest long side of a tile; smaller images are upscaled to it.
        label: a line above the grid (None: none).
        resample: "nearest" (crisp pixels, whole factors) or "lanczos" (smooth, exact size).
    """
    if resample not in RESAMPLING:
        raise ValueError(f"resample {resample!r} is not one of {sorted(RESAMPLING)}")
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cw, ch = upscaled_size(images[0].size, tile_px, resample)
    fnt = font()
    wrapped = [wrap(c, cw - 2 * PAD, fnt) for c in captions] if captions else [[]] * n
    text_h = max(len(lines) for lines in wrapped) * LINE_PX + PAD if captions else 0
    cell_w, cell_h = cw + PAD, ch + text_h + PAD
    big = font(FONT_PX + 2)
    label_lines = wrap(label, cols * cell_w - PAD, big) if label else []
    top = len(label_lines) * (LINE_PX + 2) + PAD
    canvas = Image.new("RGB", (cols * cell_w + PAD, top + rows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(label_lines):
        draw.text((PAD, PAD + j * (LINE_PX + 2)), line, fill="black", font=big)
    for i, (img, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = PAD + (i % cols) * cell_w, top + PAD + (i // cols) * cell_h
        canvas.paste(img.convert("RGB").resize((cw, ch), RESAMPLING[resample]), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + PAD, y + ch + PAD // 2 + j * LINE_PX), line, fill="black", font=fnt)
    return canvas
