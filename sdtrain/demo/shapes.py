"""The built-in demo data set: coloured shapes on a dark background, captioned by colour and shape.

Small enough to make in seconds and to learn in a minute on a CPU, and measurable: the colour a
prompt names must be the colour that comes out (see `dominant_colour`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# RGB in 0..255; far apart so a mean colour can be classified without ambiguity.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (235, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (20, 20, 20)

log = logging.getLogger(__name__)


def render(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """Draw one `shape` in `colour` at a random place and scale on a dark square canvas."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.42) * size  # half-width of the shape, in pixels
    cx, cy = (rng.uniform(r, size - r) for _ in range(2))
    fill = tuple(int(np.clip(c + rng.randint(-15, 15), 0, 255)) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return img


def samples(n: int, size: int, seed: int = 0):
    """Yield `n` (PIL image, caption) pairs cycling through every colour and shape."""
    rng = random.Random(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n):
        colour, shape = combos[i % len(combos)]
        yield render(colour, shape, size, rng), f"a {colour} {shape}"


def write_folder(out: str | Path, n: int, size: int, seed: int = 0) -> Path:
    """Write the demo set as a folder of PNGs with same-stem .txt captions (the shard tool's input)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    every = max(100, n // 10)  # a line every 10% (sets under 100 images need none)
    for i, (img, caption) in enumerate(samples(n, size, seed)):
        img.save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(caption)
        if (i + 1) % every == 0 and i + 1 < n:
            log.info("demo images: %d/%d (%d%%)", i + 1, n, 100 * (i + 1) // n)
    return out


def dominant_colour(img: Image.Image | np.ndarray) -> str:
    """Name the palette colour closest in direction to the image's mean colour above the background.

    Args:
        img: an RGB image (PIL or uint8 array of shape (H, W, 3)).

    Returns:
        One of `COLOURS`' names.
    """
    x = np.asarray(img, dtype=np.float64).reshape(-1, 3) - np.array(BACKGROUND)
    mean = np.clip(x, 0, None).mean(0)
    mean /= np.linalg.norm(mean) + 1e-8
    best, score = "", -np.inf
    for name, rgb in COLOURS.items():
        ref = np.array(rgb, dtype=np.float64) - np.array(BACKGROUND)
        s = float(mean @ (ref / np.linalg.norm(ref)))
        if s > score:
            best, score = name, s
    return best
