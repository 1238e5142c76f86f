"""decode_image gives images as their authors meant them: orientation, bit depth, alpha, modes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.datamodules.transforms import (
    BACKGROUND_RGB,
    Collate,
    ImageTextTransform,
    SkipSample,
    decode_image,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    """The image as file bytes, the way a shard holds it."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """decode_image's pixels as (H, W, 3) int16, signed so that differences do not wrap."""
    img = decode_image(data)
    assert img.mode == "RGB"
    return np.asarray(img, dtype=np.int16)


def halves(mode: str, left, right, size: tuple[int, int] = (16, 8)) -> Image.Image:
    """A `mode` image whose left half is `left` and right half is `right`."""
    w, h = size
    img = Image.new(mode, size, left)
    img.paste(right, (w // 2, 0, w, h))
    return img


def test_exif_orientation_is_applied():
    # Stored 32 wide x 16 tall, red above blue; Orientation=6 says "rotate 90 degrees clockwise to
    # view", so a viewer shows 16 wide x 32 tall with blue on the left and red on the right.
    stored = Image.new("RGB", (32, 16), RED)
    stored.paste(BLUE, (0, 8, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    px = decode(encode(stored, "JPEG", quality=95, exif=exif))
    assert px.shape == (32, 16, 3)
    np.testing.assert_allclose(px[16, 3], BLUE, atol=30)  # JPEG: colours near, not exact
    np.testing.assert_allclose(px[16, 12], RED, atol=30)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode(Image.fromarray(np.full((8, 8), 32768, np.uint16))), id="png-I;16"),
        pytest.param(encode(Image.new("I", (8, 8), 32768), "TIFF"), id="tiff-I"),
        pytest.param(encode(Image.new("I;16B", (8, 8), 32768), "TIFF"), id="tiff-I;16B"),
        pytest.param(encode(Image.new("F", (8, 8), 0.5), "TIFF"), id="tiff-F-unit"),
        pytest.param(encode(Image.new("F", (8, 8), 32768.0), "TIFF"), id="tiff-F-16bit"),
    ],
)
def test_16bit_mid_grey_becomes_128(data):
    px = decode(data)
    assert np.abs(px - 128).max() <= 1  # 32768 / 65535 * 255 = 127.5


def test_16bit_white_stays_white_and_black_black():
    data = encode(Image.fromarray(np.array([[0, 0, 65535, 65535]] * 4, np.uint16)))
    assert data[24] == 16  # IHDR bit depth: a real 16-bit PNG
    px = decode(data)
    assert (px[:, :2] == 0).all() and (px[:, 2:] == 255).all()


def test_transparent_red_becomes_background():
    px = decode(encode(Image.new("RGBA", (8, 8), (*RED, 0))))
    assert (px == BACKGROUND_RGB).all()


def test_half_transparent_red_is_blended():
    px = decode(encode(Image.new("RGBA", (8, 8), (*RED, 128))))
    a = 128 / 255
    expected = np.array(RED) * a + np.array(BACKGROUND_RGB) * (1 - a)  # white: (255, 127, 127)
    assert np.abs(px - expected).max() <= 1


@pytest.mark.parametrize("transparency", [0, b"\x00\xff"], ids=["index", "alpha-table"])
def test_palette_with_trns_transparency(transparency):
    img = halves("P", 0, 1)
    img.putpalette([*RED, *BLUE])  # index 0 red but transparent, index 1 opaque blue
    px = decode(encode(img, transparency=transparency))
    assert (px[:, :8] == BACKGROUND_RGB).all()
    assert (px[:, 8:] == BLUE).all()


def test_la_alpha_is_composited():
    px = decode(encode(halves("LA", (200, 0), (50, 255))))
    assert (px[:, :8] == BACKGROUND_RGB).all()
    assert (px[:, 8:] == 50).all()


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert b"Adobe" in data  # Pillow writes Adobe's inverted CMYK, as Photoshop does
    np.testing.assert_allclose(decode(data)[8, 8], RED, atol=8)


def test_plain_rgb_is_unchanged():
    arr = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode(encode(Image.fromarray(arr))), arr)


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", encode(Image.new("RGB", (64, 64), RED))[:60]],
    ids=["garbage", "truncated-png"],
)
def test_undecodable_bytes_raise_skip_sample(data):
    with pytest.raises(SkipSample, match=r"does not decode \(\w+Error: "):
        decode_image(data)


@pytest.mark.parametrize("side", [12, 16], ids=["warning", "error"])
def test_decompression_bomb_raises_skip_sample(monkeypatch, side):
    # Pillow warns above MAX_IMAGE_PIXELS (100: 12x12 = 144) and raises above twice it (16x16).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(SkipSample, match="DecompressionBomb"):
        decode_image(encode(Image.new("RGB", (side, side), RED)))


@pytest.fixture(scope="module")
def tokenizer():
    from sdtrain.demo.tiny import build_tokenizer

    return build_tokenizer()


def test_image_text_transform_flattens_transparent_png(tokenizer):
    img = halves("RGBA", (*RED, 0), (*BLUE, 255), size=(8, 8))
    sample = {"__key__": "k", "png": encode(img), "txt": b"a red circle"}
    # Resolution = image size, so resize_crop changes nothing and pixels are exact.
    out = ImageTextTransform(resolution=8, center_crop=True, random_flip=False)(sample)
    expected = torch.empty(3, 8, 8)  # (3, H, W) in [-1, 1]
    expected[:, :, :4] = torch.tensor(BACKGROUND_RGB).view(3, 1, 1) / 127.5 - 1
    expected[:, :, 4:] = torch.tensor(BLUE).view(3, 1, 1) / 127.5 - 1
    torch.testing.assert_close(out["pixels"], expected)
    assert out["caption"] == "a red circle"
    batch = Collate(tokenizer)([out | {"key": "k", "skipped": {}}] * 2)
    assert batch["input_ids"].shape == (2, 77) and batch["pixels"].shape == (2, 3, 8, 8)
    decoded = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert [d.strip() for d in decoded] == ["a red circle"] * 2
