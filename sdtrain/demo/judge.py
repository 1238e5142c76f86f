"""Judge a demo image: which colour and which shape does it draw?

The demo (sdtrain.demo.shapes) draws one shape in one palette colour on a dark background. Colour is the
palette colour nearest in direction to the mean colour above the background
(`demo.dominant_colour`). Shape comes from the largest blob of pixels at least half as far from
the background as that colour is: its outline, cropped to its bounding box and resized to
`TEMPLATE_PX` square, is compared with the mean outline of each shape over the demo's own renders
(a nearest-centroid classifier fit on `demo.render`, the same draws the demo's data uses).

A circle fills ~0.785 of its box, a square 1.0, a triangle 0.5 and narrows to a point at the top:
the templates tell them apart at 32 px with >= 98% accuracy (tests/demo/test_judge.py).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from sdtrain.demo import shapes as demo

TEMPLATE_PX = 12  # a blob's box resized to this square; enough to show corners and a point


@dataclass(frozen=True)
class Verdict:
    """What an image draws: a palette colour and a shape (None when nothing stands out)."""

    colour: str
    shape: str | None


def foreground(img: Image.Image | np.ndarray, colour: str) -> np.ndarray:
    """(H, W) bool: pixels at least half-way from the background to `colour`'s palette value."""
    x = np.asarray(img, dtype=np.float64)[..., :3] - np.array(demo.BACKGROUND)
    ref = np.array(demo.COLOURS[colour], dtype=np.float64) - np.array(demo.BACKGROUND)
    return (x @ ref) / (ref @ ref) > 0.5


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of `mask` (all False if `mask` is empty)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        blob, todo = [], deque([(y0, x0)])
        while todo:
            y, x = todo.popleft()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    todo.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def outline(mask: np.ndarray) -> np.ndarray | None:
    """The blob cropped to its bounding box, resized to (TEMPLATE_PX, TEMPLATE_PX) in [0, 1]."""
    blob = largest_blob(mask)
    ys, xs = np.nonzero(blob)
    if len(ys) < 4:  # nothing (or a speck) stands out: no shape
        return None
    crop = blob[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    small = Image.fromarray(crop.astype(np.uint8) * 255).resize(
        (TEMPLATE_PX, TEMPLATE_PX), Image.Resampling.BOX
    )
    return np.asarray(small, dtype=np.float64) / 255.0


@lru_cache(maxsize=4)
def templates(size: int = 32, n_per_shape: int = 60, seed: int = 1234) -> dict[str, np.ndarray]:
    """Mean outline of each shape over `n_per_shape` demo renders per colour at `size` px."""
    rng = random.Random(seed)
    out = {}
    for shape in demo.SHAPES:
        outs = []
        for i in range(n_per_shape):
            colour = list(demo.COLOURS)[i % len(demo.COLOURS)]
            o = outline(foreground(demo.render(colour, shape, size, rng), colour))
            if o is not None:
                outs.append(o)
        out[shape] = np.mean(outs, axis=0)
    return out


def judge(img: Image.Image | np.ndarray) -> Verdict:
    """The colour and shape an RGB demo-style image draws.

    Args:
        img: an RGB image (PIL or uint8 array of shape (H, W, 3)), square, at any size.

    Returns:
        A `Verdict`; its shape is None when no blob stands out from the background.
    """
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    colour = demo.dominant_colour(arr)
    o = outline(foreground(arr, colour))
    if o is None:
        return Verdict(colour, None)
    dists = {s: float(((o - t) ** 2).sum()) for s, t in templates(arr.shape[0]).items()}
    return Verdict(colour, min(dists, key=dists.get))


def parse(prompt: str) -> Verdict:
    """The colour and shape a demo caption names ("a red circle" -> Verdict("red", "circle"))."""
    words = prompt.lower().split()
    colours = [w for w in words if w in demo.COLOURS]
    shapes = [w for w in words if w in demo.SHAPES]
    if not colours or not shapes:
        raise ValueError(
            f"{prompt!r} names no demo colour and shape ({list(demo.COLOURS)}, {demo.SHAPES})"
        )
    return Verdict(colours[0], shapes[0])


def score(images: list[Image.Image], prompts: list[str]) -> dict[str, float]:
    """Share of images whose judged colour / shape is the one their prompt names.

    Returns:
        {"colour": fraction, "shape": fraction, "both": fraction}.
    """
    hits = np.zeros((len(images), 2), dtype=bool)
    for i, (img, prompt) in enumerate(zip(images, prompts, strict=True)):
        got, want = judge(img), parse(prompt)
        hits[i] = got.colour == want.colour, got.shape == want.shape
    return {
        "colour": float(hits[:, 0].mean()),
        "shape": float(hits[:, 1].mean()),
        "both": float(hits.all(1).mean()),
    }
