"""The shared grid: tiles upscaled to a readable size, captions wrapped and never cut, a label."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtrain.artifacts.sampling import LINE_PX, PAD, font, grid, upscaled_size, wrap

COLOURS = ["red", "green", "blue", "yellow"]


def tiles(size: int = 32) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), c) for c in COLOURS]


@pytest.mark.parametrize("resample", ["nearest", "lanczos"])
def test_tiny_tiles_are_upscaled_to_at_least_128_px(resample: str):
    img = grid(tiles(32), COLOURS, resample=resample)
    assert upscaled_size((32, 32), 128, resample) == (128, 128)
    assert img.width >= 2 * 128  # 2 x 2 tiles
    # the red tile's pixels: a block of at least 128 x 128 in the top-left corner
    red = np.all(np.asarray(img) == (255, 0, 0), axis=-1)
    rows, cols = np.nonzero(red)
    assert rows.max() - rows.min() + 1 >= 128 and cols.max() - cols.min() + 1 >= 128


def test_nearest_keeps_whole_factors_and_big_images_stay():
    assert upscaled_size((48, 48), 128, "nearest") == (144, 144)  # 3x, crisp pixels
    assert upscaled_size((48, 48), 128, "lanczos") == (128, 128)
    assert upscaled_size((64, 32), 128, "nearest") == (128, 64)  # aspect kept
    assert upscaled_size((512, 512), 128, "nearest") == (512, 512)  # never shrunk
    with pytest.raises(ValueError, match="resample"):
        grid(tiles(), resample="bicubic")


def test_long_captions_wrap_whole_within_the_tile():
    caption = "a small green square in the upper left corner on a light grey background"
    fnt = font()
    lines = wrap(caption, 120, fnt)
    assert len(lines) > 2
    assert " ".join(lines) == caption  # nothing cut
    assert all(fnt.getlength(line) <= 120 for line in lines)
    word = "a" * 60
    assert "".join(wrap(word, 50, fnt)) == word  # a word wider than a tile is split, not cut
    short = grid(tiles(), COLOURS)
    tall = grid(tiles(), [caption, *COLOURS[1:]])
    wrapped = len(wrap(caption, 128 - 8, fnt))
    assert tall.height - short.height == 2 * (wrapped - 1) * LINE_PX  # each row grows


def test_label_adds_a_bar_above_and_changes_only_it():
    plain, labelled = grid(tiles(), COLOURS), grid(tiles(), COLOURS, label="step 400")
    assert labelled.height > plain.height and labelled.width == plain.width
    bar = labelled.height - plain.height
    start = 2 * PAD  # where the tiles begin in the plain grid
    assert np.array_equal(np.asarray(labelled)[bar + start :], np.asarray(plain)[start:])
    assert (np.asarray(labelled)[:bar] < 128).any()  # dark text pixels in the bar
