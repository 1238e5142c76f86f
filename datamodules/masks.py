"""Per-sample loss masks: which pixels of an image the diffusion loss trains on (`data.mask`).

`data.mask=file` reads `KEY.mask.png` beside the image in the shard: greyscale, white trains,
black does not, grey in between (a colour mask is read as its luminance). A sample without one is
skipped as `no_mask` (logged as `data/skipped/no_mask`): a forgotten mask would otherwise train
the whole image without a word. A mask that does not decode, or whose size is not its image's
(EXIF orientation applied to both), is skipped as `bad_mask`.

`data.mask=alpha` reads the image's own alpha channel (opaque trains, transparent does not); an
image without transparency is all opaque, so it trains at full weight. The image itself is still
composited onto white as without masks (`transforms.decode_image`).

The mask follows its image: `MaskTransform` reads where the image transform resized, cropped and
flipped the image (its crop record, "meta") and does the same to the mask, with the same filter
(Lanczos) to the same size and box, so buckets, random crops and flips all apply alike. Examples
hold it as "mask" (1, H, W) float in [0, 1] at pixel resolution; the training step area-averages
it to the latent grid (`sdtrain.training.masked_loss`). A latent cache stores that latent-grid
mask itself (`KEY.mask.npy`, (1, h, w) fp16: `sdtrain.artifacts.cache`).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.images import _open_checked, _to_8bit
from sdtrain.datamodules.transforms import (
    ImageTextTransform,
    LatentTransform,
    SkipSample,
    find_image,
)

MODES = ("file", "alpha")  # data.mask; null: no masks
MASK_EXT = "mask.png"  # KEY.mask.png beside KEY.jpg|png|webp
CACHE_EXT = "mask.npy"  # a latent cache's (1, h, w) latent-grid mask


def check_mode(mode: str | None) -> None:
    """Refuse a `data.mask` that is not null, file or alpha."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"data.mask={mode!r}; use null, {' or '.join(MODES)}")


def _decode(data: bytes, max_pixels: int | None) -> Image.Image:
    """Bytes -> an image as shown (EXIF orientation applied), high bit depths scaled to 8 bits."""
    img = _open_checked(data, max_pixels)
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    return _to_8bit(img)


def read_mask(sample: dict, mode: str, max_pixels: int | None) -> Image.Image | None:
    """The sample's mask as an 8-bit "L" image the size of its image as shown, or None for full
    weight (alpha mode, an image without transparency). Raises SkipSample (`no_mask`,
    `bad_mask`) as the module docs say."""
    if mode == "file":
        if not sample.get(MASK_EXT):
            raise SkipSample(f"no .{MASK_EXT} (data.mask=file)", "no_mask")
        data, what = sample[MASK_EXT], f".{MASK_EXT}"
    else:
        data, what = find_image(sample), "image's alpha channel"
    try:
        img = _decode(data, max_pixels)
        if mode == "file":
            return img.convert("L")
        if not {"A", "a"} & set(img.getbands()) and "transparency" not in img.info:
            return None
        return img.convert("RGBA").getchannel("A")
    except SkipSample as e:
        raise SkipSample(f"{what}: {e}", "bad_mask") from e
    except Exception as e:  # PIL raises many types for broken files
        raise SkipSample(f"{what} does not decode ({type(e).__name__}: {e})", "bad_mask") from e


def place_mask(mask: Image.Image | None, meta: dict) -> torch.Tensor:
    """(1, H, W) float in [0, 1]: `mask` resized, cropped and flipped as its image was (`meta`:
    `ImageTextTransform`'s crop record); all ones for None."""
    left, top, right, bottom = meta["crop_box"]
    if mask is None:
        return torch.ones(1, bottom - top, right - left)
    if list(mask.size) != list(meta["original_size"]):
        w, h = meta["original_size"]
        raise SkipSample(f"mask is {mask.width} x {mask.height}, its image {w} x {h}", "bad_mask")
    mask = mask.resize(tuple(meta["resized_size"]), Image.Resampling.LANCZOS)
    mask = mask.crop((left, top, right, bottom))
    if meta["flipped"]:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(mask, dtype=np.uint8).copy()  # (H, W)
    return torch.from_numpy(arr).float().div(255.0).unsqueeze(0)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) mask -> (B, 1, h, w) fp32 on the latent grid `size`, each cell the mean of
    the pixels it covers (area interpolation); a mask already of that size as it is."""
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="area")


class MaskTransform:
    """An image transform (`ImageTextTransform` or `BucketTransform`) whose examples also hold
    "mask" (1, H, W): the sample's mask placed as its image was (see the module docs).

    It turns the inner transform's crop record on and drops it again from the examples unless
    the inner one kept it already (a latent cache's). The crop and flip draws are the inner
    transform's own, so a sample crops as it would without a mask.
    """

    def __init__(self, inner: ImageTextTransform, mode: str) -> None:
        check_mode(mode)
        self.inner, self.mode = inner, mode
        self.keep_meta = inner.with_meta
        inner.with_meta = True

    def precheck(self, sample: dict) -> tuple[int, int] | None:
        """The inner transform's precheck, and `no_mask` for a missing mask file."""
        bucket = self.inner.precheck(sample)
        if self.mode == "file" and not sample.get(MASK_EXT):
            raise SkipSample(f"no .{MASK_EXT} (data.mask=file)", "no_mask")
        return bucket

    def __call__(self, sample: dict, rng: random.Random | None = None) -> dict:
        example = self.inner(sample, rng)  # skips for the image's reasons first, as without
        meta = example["meta"] if self.keep_meta else example.pop("meta")
        mask = read_mask(sample, self.mode, self.inner.max_pixels)
        example[B.MASK] = place_mask(mask, meta)
        return example


def with_masks(
    transform: ImageTextTransform | LatentTransform, mode: str | None, info: dict | None
) -> ImageTextTransform | LatentTransform | MaskTransform:
    """`transform` with masks per `data.mask`: image transforms wrapped in `MaskTransform`; a
    latent cache's (`info`: its cache.json) loads its stored masks only when `mode` is set, and
    refuses to run masked from a cache made without them."""
    check_mode(mode)
    if isinstance(transform, LatentTransform):
        stored = B.MASK in transform.files
        if mode is not None and not stored:
            raise ValueError(
                f"data.mask={mode} but latent cache {(info or {}).get('folder')} holds no masks: "
                f"cache again with `sdtrain-cache-latents SRC OUT --pretrained DIR --mask {mode}`"
            )
        if mode is None and stored:  # trained unmasked: the masks stay unread
            transform.files = {k: v for k, v in transform.files.items() if k != B.MASK}
        return transform
    return transform if mode is None else MaskTransform(transform, mode)
