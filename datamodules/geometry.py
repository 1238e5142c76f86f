"""Where an image is resized and cropped (square or bucket), the cut, SDXL's size conditioning."""

from __future__ import annotations

import random

from PIL import Image


def crop_box(
    width: int, height: int, size: int, center_crop: bool, rng: random.Random | None = None
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where `resize_crop` cuts a `width` x `height` image to a `size` square: `bucket_crop_box`
    for the bucket (size, size). Returned apart so a latent cache can record it per sample."""
    return bucket_crop_box(width, height, (size, size), center_crop, rng)


def bucket_crop_box(
    width: int,
    height: int,
    bucket: tuple[int, int],
    center_crop: bool,
    rng: random.Random | None = None,
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where a `width` x `height` image is cut for a (w, h) `bucket`: (resized (w, h), (left, top,
    right, bottom) in resized pixels). The resize is the smallest that covers the bucket, so only
    the overhang of the longer relative side is cropped. A random crop draws from `rng` (default:
    the `random` module)."""
    rng = rng or random  # the module's functions: the same methods on its own generator
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    nw, nh = max(bw, round(width * scale)), max(bh, round(height * scale))
    if center_crop:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    else:
        left, top = rng.randint(0, nw - bw), rng.randint(0, nh - bh)
    return (nw, nh), (left, top, left + bw, top + bh)


def size_conditioning(
    original: tuple[int, int],
    resized: tuple[int, int],
    box: tuple[int, int, int, int],
    flipped: bool,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """SDXL's size and crop conditioning of one image: ((height, width) as decoded, (top, left)
    of its crop in resized pixels), from its decoded (w, h) `original` size, its `resized` (w, h)
    and the (left, top, right, bottom) crop `box` (`bucket_crop_box`).

    A flipped image's crop left is the one in the flipped image, resized width - right edge: the
    flip mirrors the crop window too. Diffusers' SDXL scripts get the same by flipping before
    they crop (huggingface/diffusers#6547; before it they subtracted the left from the cropped
    width). The training image is the same either way: crop then flip, or flip then crop there.
    """
    (width, height), (resized_width, _), (left, top, right, _) = original, resized, box
    return (height, width), (top, resized_width - right if flipped else left)


def resize_crop(
    img: Image.Image, size: int, center_crop: bool, box: tuple | None = None
) -> Image.Image:
    """Resize the short side to `size` (Lanczos), then crop a `size` square (centre or random).

    `box` is a `crop_box` result to apply; None draws one here.
    """
    (nw, nh), corners = box or crop_box(*img.size, size, center_crop)
    return img.resize((nw, nh), Image.Resampling.LANCZOS).crop(corners)
