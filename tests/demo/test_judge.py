"""The demo judge names the colour and shape of the demo's own renders, and refuses to see shapes
in shapeless images, so a demo test that relies on it measures what the model draws."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdtrain.demo import shapes as demo
from sdtrain.demo.judge import Verdict, judge, parse, score


def renders(n: int, size: int = 32, seed: int = 7) -> tuple[list[Image.Image], list[str]]:
    """`n` fresh demo renders (seeds unlike the judge's templates), cycling every colour and shape."""
    rng = random.Random(seed)
    combos = [(c, s) for c in demo.COLOURS for s in demo.SHAPES]
    pairs = [combos[i % len(combos)] for i in range(n)]
    return [demo.render(c, s, size, rng) for c, s in pairs], [f"a {c} {s}" for c, s in pairs]


def test_judge_scores_at_least_98_percent_on_fresh_renders():
    images, prompts = renders(480)
    got = score(images, prompts)
    assert got["colour"] >= 0.98 and got["shape"] >= 0.98, got


def test_judge_reads_renders_at_other_sizes():
    images, prompts = renders(48, size=48, seed=3)
    got = score(images, prompts)
    assert got["colour"] >= 0.98 and got["shape"] >= 0.98, got


def test_judge_survives_the_blur_of_a_vae_round_trip():
    """A light blur (what a small VAE's decoder does to edges) keeps every shape readable."""
    images, prompts = renders(120, seed=11)
    blurred = [img.filter(ImageFilter.GaussianBlur(0.7)) for img in images]
    got = score(blurred, prompts)
    assert got["colour"] >= 0.95 and got["shape"] >= 0.95, got


def test_a_shapeless_image_has_no_shape():
    flat = Image.new("RGB", (32, 32), demo.BACKGROUND)
    assert judge(flat).shape is None


def test_a_blob_is_not_a_square_or_a_triangle():
    """A soft round blob (what an undertrained model draws) reads as a circle at most."""
    yy, xx = np.mgrid[:32, :32]
    blob = np.exp(-((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / (2 * 6.0**2))[..., None]
    bg, red = np.array(demo.BACKGROUND), np.array(demo.COLOURS["red"])
    img = Image.fromarray((bg + blob * (red - bg)).round().astype(np.uint8))
    assert judge(img) == Verdict("red", "circle")


def test_a_filled_canvas_is_not_a_shape_of_the_prompt():
    """Colour everywhere (a box with nothing cut out) is judged a square, not a circle or triangle."""
    img = Image.new("RGB", (32, 32), demo.COLOURS["blue"])
    assert judge(img).shape == "square"


def test_parse_reads_the_caption():
    assert parse("a yellow triangle") == Verdict("yellow", "triangle")
    with pytest.raises(ValueError, match="purple blob"):
        parse("a purple blob")
