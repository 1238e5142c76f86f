"""Turn one raw WebDataset sample (bytes per extension) into a training example, or say why not:
image shards (`ImageTextTransform`) or latent-cache shards (`LatentTransform`), batched by `Collate`.
What they read and do lives beside: `samples` (fields, SkipSample), `images` (decoding), `geometry`
(crops, size conditioning); their names stay importable from here."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import torch
from PIL import Image

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.captions import CaptionProcessor
from sdtrain.datamodules.geometry import (  # noqa: F401  (re-exported: this module's API)
    bucket_crop_box,
    crop_box,
    resize_crop,
    size_conditioning,
)
from sdtrain.datamodules.images import (  # noqa: F401  (re-exported: this module's API)
    BACKGROUND_RGB,
    MAX_IMAGE_PIXELS,
    decode_image,
    image_size,
    to_tensor,
)
from sdtrain.datamodules.samples import (  # noqa: F401  (re-exported: this module's API)
    CAPTION_JSON_FIELDS,
    IMAGE_EXTS,
    SKIP_KINDS,
    SkipSample,
    find_caption,
    find_image,
)
from sdtrain.models.parts import tokenize

BUCKET = "__bucket__"  # a raw sample's (width, height) bucket, set where its batch was formed


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
