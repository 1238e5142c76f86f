"""Turn one raw WebDataset sample (bytes per extension) into a training example, or say why not:
image shards (`ImageTextTransform`) or latent-cache shards (`LatentTransform`), batched by `Collate`."""

from __future__ import annotations

import io
import json
import random
import warnings
from collections import Counter

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.captions import CaptionProcessor
from sdtrain.models.parts import tokenize

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_JSON_FIELDS = ("caption", "text", "prompt")  # img2dataset writes "caption"
# Transparent pixels land on white: what browsers and viewers show, and what cut-out product shots,
# logos and line art were drawn to sit on. Black would swallow dark-on-transparent logos and text.
BACKGROUND_RGB = (255, 255, 255)


SKIP_KINDS = B.SKIP_KINDS
BUCKET = "__bucket__"  # a raw sample's (width, height) bucket, set where its batch was formed
MAX_IMAGE_PIXELS = 64_000_000  # default data.max_image_pixels: an 8000 x 8000 image


class SkipSample(Exception):
    """A sample that cannot be trained on; `kind` is one of SKIP_KINDS."""

    def __init__(self, message: str, kind: str) -> None:
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {kind!r}")
        super().__init__(message)
        self.kind = kind


def find_image(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if sample.get(ext):
            return sample[ext]
    raise SkipSample(f"no image (looked for .{', .'.join(IMAGE_EXTS)})", "no_image")


def find_caption(sample: dict) -> str:
    """Caption from `KEY.txt`, else from `caption`/`text`/`prompt` in `KEY.json`."""
    if sample.get("txt"):
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise SkipSample(f"caption is not UTF-8 ({e})", "bad_caption") from e
        if text:
            return text
    if sample.get("json"):
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise SkipSample(f"unreadable .json ({e})", "bad_caption") from e
        for field in CAPTION_JSON_FIELDS:
            if isinstance(meta, dict) and isinstance(meta.get(field), str) and meta[field].strip():
                return meta[field].strip()
    raise SkipSample("no caption (.txt, or caption/text/prompt in .json)", "no_caption")


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


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1], the range the SD VAE expects."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageTextTransform:
    """Raw sample -> {"pixels", "caption", "original_size", "crop_top_left"}; raises SkipSample
    when unusable.

    Captions are tokenized per batch (`Collate`), not here: one tokenizer call for the batch is
    ~15x cheaper than one per sample, which had made tokenizing the data loader's bottleneck.
    "original_size" and "crop_top_left" are SDXL's size conditioning as this sample was decoded,
    cropped and flipped (`size_conditioning`); SD-1.x/2.x ignore them. With `with_meta` the
    example also holds "meta": the decoded size, the resized size, the crop box and whether it
    was flipped (what a latent cache records per sample).
    """

    def __init__(
        self,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        with_meta: bool = False,
        max_pixels: int | None = MAX_IMAGE_PIXELS,
        captions: CaptionProcessor | None = None,
    ):
        self.resolution = resolution
        self.captions = captions  # template / tag shuffling (datamodules.captions), or None
        self.max_pixels = max_pixels
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.with_meta = with_meta

    def precheck(self, sample: dict) -> tuple[int, int] | None:
        """Raise SkipSample now for what shows without decoding (no caption, no image, an image
        header that does not read or is too large); the bucket the sample goes to, or None (one
        square shape). `data.resampled=false` forms each pass's batches from this before any
        sample is decoded (datamodules/passes.py)."""
        find_caption(sample)
        image_size(find_image(sample), self.max_pixels)
        return None

    def place(
        self, width: int, height: int, rng: random.Random, bucket: tuple[int, int] | None = None
    ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """Where a `width` x `height` image is resized and cropped (`crop_box`'s result): a
        `resolution` square here; aspect-ratio buckets (datamodules.buckets) override it, into
        `bucket` where the batch it goes into was formed for one."""
        return crop_box(width, height, self.resolution, self.center_crop, rng)

    def __call__(self, sample: dict, rng: random.Random | None = None) -> dict:
        """`rng` draws the random crop and flip (default: the `random` module); the data
        pipeline passes one seeded by the sample's place in the data, so a resumed run crops
        each sample as the uninterrupted run would have."""
        rng = rng or random  # the module's functions: the same methods on its own generator
        caption = find_caption(sample)
        img = decode_image(find_image(sample), self.max_pixels)
        original = img.size  # (w, h) as decoded, EXIF orientation applied
        box = self.place(*original, rng, sample.get(BUCKET))
        img = resize_crop(img, self.resolution, self.center_crop, box)
        flipped = self.random_flip and rng.random() < 0.5
        if flipped:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.captions is not None:  # drawn after the crop and flip: those stay as without it
            caption = self.captions(caption, rng)
        example = {B.PIXELS: to_tensor(img), "caption": caption}
        sizes = size_conditioning(original, *box, flipped)
        example[B.ORIGINAL_SIZE], example[B.CROP_TOP_LEFT] = sizes
        if self.with_meta:
            example["meta"] = {
                "original_size": list(original),
                "resized_size": list(box[0]),
                "crop_box": list(box[1]),  # left, top, right, bottom in resized pixels
                "flipped": flipped,
            }
        return example


def load_npy(data: bytes, bf16_bits: bool = False) -> torch.Tensor:
    """`.npy` bytes -> a float32 tensor; with `bf16_bits` the array holds bfloat16 bit patterns
    as uint16 (numpy has no bfloat16).

    np.load runs with allow_pickle=False: a shard can hold arrays, never code.
    """
    t = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    return (t.view(torch.bfloat16) if bf16_bits else t).float()


CROP_RECORD = ("original_size", "resized_size", "crop_box")  # a latent cache's KEY.json


def cached_sizes(sample: dict) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """`size_conditioning` from a latent-cache sample's KEY.json (`ImageTextTransform`'s "meta"),
    or None when it has no such record (a cache made elsewhere)."""
    if not sample.get("json"):
        return None
    try:
        meta = json.loads(sample["json"])
        if not all(k in meta for k in CROP_RECORD):
            return None
        return size_conditioning(
            *(tuple(map(int, meta[k])) for k in CROP_RECORD), bool(meta.get("flipped"))
        )
    except (ValueError, TypeError) as e:  # not JSON, or sizes that are no numbers
        raise SkipSample(f"unreadable .json crop record ({e})", "bad_latent") from e


class LatentTransform:
    """Raw latent-cache sample -> {"latent_dist", "caption"}, "context" and "pooled" if cached,
    and the "original_size" and "crop_top_left" of the image it was encoded from (read from
    KEY.json; left out for a sample without that record).

    Args:
        files: the cache's extension per tensor (cache.json "files": latent_dist, context,
            pooled).
        dtype: how latent_dist is stored ("fp16" or "bf16", cache.json "dtype"); a context and
            a pooled embedding are always fp16.
        latent_shape: (2C, h, w) every sample must have, so batches stack.
    """

    def __init__(
        self,
        files: dict[str, str],
        dtype: str,
        latent_shape: list[int],
        captions: CaptionProcessor | None = None,
    ) -> None:
        if captions is not None and B.CONTEXT in files:
            raise ValueError(
                "data.caption_template / data.shuffle_tags cannot change the captions of a latent "
                "cache that holds text contexts (made with --text): cache again without --text"
            )
        self.captions = captions  # template / tag shuffling of the captions it tokenizes
        self.files = files
        self.dtype = dtype
        self.latent_shape = tuple(latent_shape)

    def precheck(self, sample: dict) -> None:
        """Raise SkipSample now for a missing caption or tensor file (see ImageTextTransform)."""
        find_caption(sample)
        for ext in self.files.values():
            if not sample.get(ext):
                raise SkipSample(f"no .{ext}", "bad_latent")

    def __call__(self, sample: dict, rng: random.Random | None = None) -> dict:
        """`rng` draws the tag shuffle of `captions` (nothing else here is random)."""
        caption = find_caption(sample)
        if self.captions is not None:
            caption = self.captions(caption, rng)
        example = {"caption": caption}
        for name, ext in self.files.items():
            if not sample.get(ext):
                raise SkipSample(f"no .{ext}", "bad_latent")
            try:
                bf16 = name == B.LATENT_DIST and self.dtype == "bf16"
                example[name] = load_npy(sample[ext], bf16_bits=bf16)
            except (ValueError, OSError, EOFError, RuntimeError) as e:  # truncated, foreign bytes
                raise SkipSample(f"unreadable .{ext} ({e})", "bad_latent") from e
        if tuple(example[B.LATENT_DIST].shape) != self.latent_shape:
            shape = tuple(example[B.LATENT_DIST].shape)
            raise SkipSample(
                f".{self.files[B.LATENT_DIST]} has shape {shape}, not {self.latent_shape}",
                "bad_latent",
            )
        sizes = cached_sizes(sample)
        if sizes is not None:  # the same time_ids as the pixel batch it came from (SDXL)
            example[B.ORIGINAL_SIZE], example[B.CROP_TOP_LEFT] = sizes
        return example


class Collate:
    """Examples -> one batch (the contract in sdtrain.datamodules.batch): the examples' tensors stacked
    (pixels or latent_dist, and context, pooled and mask if they hold them), captions tokenized in one
    call unless a context stands in for them, and each image's original size and crop as (B, 2)
    long tensors when every example has them."""

    STACKED = (B.PIXELS, B.LATENT_DIST, B.CONTEXT, B.POOLED, B.MASK)
    SIZES = (B.ORIGINAL_SIZE, B.CROP_TOP_LEFT)  # (height, width), (top, left) per example

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, examples: list[dict]) -> dict:
        captions = [e["caption"] for e in examples]
        # (B, 3, H, W) pixels or (B, 2C, h, w) latent_dist; (B, 77, D) context
        batch = {k: torch.stack([e[k] for e in examples]) for k in self.STACKED if k in examples[0]}
        if B.CONTEXT not in batch:
            batch[B.INPUT_IDS] = tokenize(self.tokenizer, captions)  # (B, 77); SDXL (B, 2, 77)
        for key in self.SIZES:
            if all(key in e for e in examples):
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)  # (B, 2)
        batch[B.CAPTIONS] = captions
        batch[B.KEYS] = [e["key"] for e in examples]  # the samples' __key__, set by DecodeStage
        if "position" in examples[-1]:  # the place after the batch's last sample
            worker, workers, passes, number = examples[-1]["position"]
            batch[B.POSITION] = [worker, workers, passes, number + 1]
        batch[B.SKIPPED] = sum(sum(e["skipped"].values()) for e in examples)
        batch[B.SKIPPED_KINDS] = {
            k: sum(e["skipped"].get(k, 0) for e in examples) for k in SKIP_KINDS
        }
        shards: Counter[str] = Counter()
        for e in examples:
            shards.update(e.get("skipped_shards") or {})
        batch[B.SKIPPED_SHARDS] = dict(shards)
        return batch
