"""Image bytes -> 8-bit RGB as a viewer shows them, its size from the header, and RGB -> tensor."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from sdtrain.datamodules.samples import SkipSample

# Transparent pixels land on white: what browsers and viewers show, and what cut-out product shots,
# logos and line art were drawn to sit on. Black would swallow dark-on-transparent logos and text.
BACKGROUND_RGB = (255, 255, 255)

MAX_IMAGE_PIXELS = 64_000_000  # default data.max_image_pixels: an 8000 x 8000 image


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale high-bit-depth greyscale ("I;16*", "I", "F") to 8-bit "L"; other modes pass through.

    Integers are read as 16-bit (0..65535 -> 0..255; 16-bit PNGs open as "I;16" or, in older
    Pillow, "I"). Floats are read as [0, 1] when none exceeds 1, else as the 16-bit range. A grey
    value marked transparent by tRNS becomes an alpha band ("LA").
    """
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img  # 8 bits already: Pillow itself reduces 16-bit RGB(A) PNGs to 8 bits per channel
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))  # (H, W)
    scaled = arr * 255.0 if img.mode == "F" and arr.max() <= 1.0 else arr / 257.0  # 65535/257=255
    out = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if isinstance(img.info.get("transparency"), int):
        alpha = np.where(arr == img.info["transparency"], 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha)))
    return out


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite alpha (RGBA, LA, PA) or tRNS transparency (P, L, RGB) onto `BACKGROUND_RGB`.

    Returns an RGB image, blended as `fg * a + bg * (1 - a)`; images without transparency pass
    through unchanged.
    """
    if not {"A", "a"} & set(img.getbands()) and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")  # applies a palette's or a colour's tRNS entry as alpha
    out = Image.new("RGB", img.size, BACKGROUND_RGB)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _open_checked(data: bytes, max_pixels: int | None) -> Image.Image:
    """The image's header (Pillow reads no pixels yet), refused above `max_pixels`."""
    img = Image.open(io.BytesIO(data))  # reads the header only
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise SkipSample(
            f"image is {w} x {h} = {w * h} pixels, over data.max_image_pixels={max_pixels}",
            "too_large",
        )
    return img


def _skip_unreadable(read, data: bytes, max_pixels: int | None):
    """`read(image header)` under the decode rules: a decompression bomb or more than
    `max_pixels` pixels is `too_large`, anything Pillow cannot read is `decode`."""
    try:
        with warnings.catch_warnings():
            # Pillow raises above 2x Image.MAX_IMAGE_PIXELS but only warns above 1x; skip both,
            # as one ~90-megapixel image is hundreds of MB per DataLoader worker.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return read(_open_checked(data, max_pixels))
    except SkipSample:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise SkipSample(f"decompression bomb ({type(e).__name__}: {e})", "too_large") from e
    except Exception as e:  # PIL raises many types for broken files and unconvertible modes
        raise SkipSample(f"image does not decode ({type(e).__name__}: {e})", "decode") from e


def _decoded(img: Image.Image) -> Image.Image:
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    return _flatten_alpha(_to_8bit(img)).convert("RGB")


def _shown_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    # EXIF orientations 5-8 turn the image a quarter: a viewer shows it h x w
    return (h, w) if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8) else (w, h)


def decode_image(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to 8-bit RGB as a viewer would show them.

    EXIF orientation is applied, 16-bit and float greyscale is scaled to 8 bits, transparency is
    composited onto `BACKGROUND_RGB`, and palette, grey, 1-bit, CMYK and YCbCr are converted to RGB.

    Raises:
        SkipSample: the bytes do not decode, or the image has more than `max_pixels` pixels
            (read from the header, before decoding) or is a decompression bomb.
    """
    return _skip_unreadable(_decoded, data, max_pixels)


def image_size(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of image bytes as `decode_image` would return them (EXIF orientation
    applied), from the header alone; raises SkipSample as `decode_image` does for a header."""
    return _skip_unreadable(_shown_size, data, max_pixels)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1], the range the SD VAE expects."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
