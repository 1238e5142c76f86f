"""A harder parity task: ten fine-grained glyph classes that differ in shape only.

Capital letters that come in near pairs (C/G, O/Q, P/R, E/F, D/B), drawn as strokes in four
"fonts" (regular, condensed with serifs, wide italic, narrow italic with serifs) with random
affine jitter (rotation, scale, shear, position), stroke width and blur: dark strokes on a light
ground, greyscale, captioned "the letter C". Rendered procedurally (no font files), so every
machine draws the same images from the same seed.

    from scripts.glyphs import CLASSES, render_set
    images, labels = render_set(1800, seed=0)          # PIL RGB 32 px, labels in class order
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("C", "G", "O", "Q", "D", "B", "P", "R", "E", "F")
SUPERSAMPLE = 4  # drawn at 4x and reduced: anti-aliased strokes of sub-pixel width

# Fonts: (width factor, italic shear, serifs). Each image picks one at random.
FONTS = ((1.0, 0.0, False), (0.78, 0.0, True), (1.15, 0.22, False), (0.85, 0.3, True))


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float) -> list:
    """Points of an elliptical arc from `start` to `end` degrees (0 = right, 90 = down)."""
    n = max(4, int(abs(end - start) / 10))
    angles = np.radians(np.linspace(start, end, n + 1))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def _bowl(top: float, bottom: float) -> list:
    """A P/R/B bowl: bar out, half an ellipse, bar back (a D-shape on the stem's right)."""
    mid, r = (top + bottom) / 2, (bottom - top) / 2
    return [(0.0, top), *_arc(0.6, mid, 0.38, r, -90, 90), (0.0, bottom)]


def strokes(letter: str) -> list[list[tuple[float, float]]]:
    """The letter as polylines in a unit box (x right, y down); the first point of a polyline and
    the last are its free ends (where serifs go)."""
    stem = [(0.0, 0.0), (0.0, 1.0)]
    o = _arc(0.5, 0.5, 0.5, 0.5, 0, 360)
    c = _arc(0.5, 0.5, 0.5, 0.5, 45, 315)
    table = {
        "O": [o],
        "Q": [o, [(0.62, 0.72), (1.0, 1.08)]],
        "C": [c],
        "G": [c, [(0.55, 0.58), (0.92, 0.58), (0.92, 0.82)]],
        "D": [stem, [(0.0, 0.0), *_arc(0.42, 0.5, 0.58, 0.5, -90, 90), (0.0, 1.0)]],
        "B": [
            stem,
            _bowl(0.0, 0.48),
            [(0.0, 0.48), *_arc(0.62, 0.74, 0.4, 0.26, -90, 90), (0.0, 1.0)],
        ],
        "P": [stem, _bowl(0.0, 0.52)],
        "R": [stem, _bowl(0.0, 0.52), [(0.45, 0.52), (0.95, 1.0)]],
        "E": [stem, [(0.0, 0.0), (0.9, 0.0)], [(0.0, 0.5), (0.72, 0.5)], [(0.0, 1.0), (0.9, 1.0)]],
        "F": [stem, [(0.0, 0.0), (0.9, 0.0)], [(0.0, 0.5), (0.72, 0.5)]],
    }
    return table[letter]


def _serifs(line: list[tuple[float, float]], length: float = 0.12) -> list:
    """Short bars across both free ends of a straight stroke (open curves get none)."""
    if len(line) != 2:
        return []
    (x0, y0), (x1, y1) = line
    d = math.hypot(x1 - x0, y1 - y0) or 1.0
    nx, ny = -(y1 - y0) / d * length, (x1 - x0) / d * length  # normal to the stroke
    return [[(x - nx, y - ny), (x + nx, y + ny)] for x, y in ((x0, y0), (x1, y1))]


def render(letter: str, size: int, rng: random.Random, jitter: float = 1.0) -> Image.Image:
    """One jittered glyph: RGB (greyscale values), `size` px. `jitter` scales the random
    rotation, shear, offset and blur (1: +-10 degrees, +-0.08, +-0.08 of the image, 0-0.7 px)."""
    width_f, italic, serif = rng.choice(FONTS)
    lines = strokes(letter)
    if serif:
        lines = lines + [s for line in lines for s in _serifs(line)]
    angle = math.radians(rng.uniform(-10, 10) * jitter)
    scale = rng.uniform(0.5, 0.68) * size * SUPERSAMPLE  # glyph height in pixels
    shear = italic + rng.uniform(-0.08, 0.08) * jitter
    cx = (0.5 + rng.uniform(-0.08, 0.08) * jitter) * size * SUPERSAMPLE
    cy = (0.5 + rng.uniform(-0.08, 0.08) * jitter) * size * SUPERSAMPLE
    cos, sin = math.cos(angle), math.sin(angle)

    def place(x: float, y: float) -> tuple[float, float]:
        x, y = (x - 0.5) * width_f * 0.8, y - 0.5  # letters are 0.8 as wide as tall
        x = x - shear * y  # italic: the top leans right
        x, y = x * cos - y * sin, x * sin + y * cos
        return cx + x * scale, cy + y * scale

    big = size * SUPERSAMPLE
    paper, ink = rng.randint(215, 255), rng.randint(0, 70)
    img = Image.new("L", (big, big), paper)
    draw = ImageDraw.Draw(img)
    w = rng.uniform(1.3, 3.0) * SUPERSAMPLE  # stroke width, in output pixels x 4
    for line in lines:
        pts = [place(x, y) for x, y in line]
        draw.line(pts, fill=ink, width=round(w), joint="curve")
        for x, y in (pts[0], pts[-1]):  # round caps
            draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=ink)
    img = img.resize((size, size), Image.Resampling.BOX)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.7) * jitter))
    return img.convert("RGB")


def caption(label: int) -> str:
    return f"the letter {CLASSES[label]}"


def render_set(
    n: int, seed: int, size: int = 32, classes: int = len(CLASSES), jitter: float = 1.0
) -> tuple[list[Image.Image], torch.Tensor]:
    """`n` glyphs of the first `classes` classes, class by class (the first n/10 are C, then G,
    ...: the order a folder sorted by class gives), and their labels (n,)."""
    rng = random.Random(seed)
    labels = torch.arange(classes).repeat_interleave(math.ceil(n / classes))[:n]
    return [render(CLASSES[int(y)], size, rng, jitter) for y in labels], labels
