"""Aspect-ratio buckets: train on images near their own shape instead of square crops.

A bucket is a (width, height) of about the pixel count of `resolution`²; each image goes to the
bucket nearest its aspect ratio, is resized until it covers the bucket and cropped to it (at
random or centred), so a wide photo loses a sliver instead of its sides. `BucketBatcher` keeps one
buffer per bucket inside each DataLoader worker and emits a batch as soon as one holds
`batch_size` samples, so every batch has one shape. Buffers outlive a pass over the shards: a
partial bucket at the end of a pass fills up in the next one, nothing is dropped.

Each example records SDXL's size conditioning as every image example does (`original_size` as
(height, width) and `crop_top_left` as (top, left) in resized pixels:
`transforms.size_conditioning`); SD-1 ignores them.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.captions import CaptionProcessor
from sdtrain.datamodules.transforms import (  # noqa: F401  (bucket_crop_box: this module's API)
    MAX_IMAGE_PIXELS,
    ImageTextTransform,
    bucket_crop_box,
    find_caption,
    find_image,
    image_size,
)

Bucket = tuple[int, int]  # (width, height) in pixels


def derive_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[Bucket]:
    """Buckets of at most `resolution`² pixels, sides multiples of `step`, no side more than
    `max_aspect` times the other; sorted wide-last by aspect ratio.

    For each width w (a multiple of `step`) the height is the largest multiple of `step` with
    w x h <= resolution², as NovelAI's and kohya's bucketing do; each bucket comes with its
    transpose so portrait and landscape are served alike. At 512 px, step 64, aspect 2:
    (384, 640), (448, 576), (512, 512), (576, 448), (640, 384) and a few more.
    """
    if resolution % step:
        raise ValueError(
            f"data.resolution={resolution} is not a multiple of data.bucket_step={step}"
        )
    if max_aspect < 1:
        raise ValueError(f"data.bucket_max_aspect={max_aspect} must be >= 1")
    area = resolution * resolution
    found = set()
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_aspect:
            found.update({(w, h), (h, w)})
    return sort_buckets(found)


def sort_buckets(buckets) -> list[Bucket]:
    """Unique buckets by aspect ratio (tall first), then width."""
    return sorted(set(map(tuple, buckets)), key=lambda b: (b[0] / b[1], b[0]))


def parse_buckets(
    buckets: str | Sequence[Sequence[int]] | None,
    resolution: int | None,
    step: int = 64,
    max_aspect: float = 2.0,
) -> list[Bucket] | None:
    """`data.buckets` as a bucket list: None (off), "auto" (derive_buckets from `resolution`) or
    a list of [width, height], each side a positive multiple of `step` (the latent has to halve
    evenly through the VAE and every U-Net down block: 8 x 8 = 64 for SD)."""
    if buckets is None:
        return None
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"data.bucket_step={step!r} must be a whole number >= 1")
    if buckets == "auto":
        if resolution is None:
            raise ValueError("data.buckets=auto derives buckets from data.resolution: set one")
        return derive_buckets(resolution, step, max_aspect)
    if isinstance(buckets, str) or not buckets:
        raise ValueError(
            f"data.buckets={buckets!r} must be null, auto or a list of [width, height]"
        )
    for b in buckets:
        ok = isinstance(b, Sequence) and len(b) == 2
        if not ok or any(not isinstance(v, int) or v < step or v % step for v in b):
            raise ValueError(
                f"data.buckets entry {b!r} must be [width, height], each a multiple of "
                f"data.bucket_step={step}"
            )
    return sort_buckets(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (on a log scale, so 2:1 and 1:2 are
    equally far from 1:1); the first such bucket on a tie."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


class BucketTransform(ImageTextTransform):
    """Raw sample -> {"pixels" (3, bucket h, bucket w), "caption", "original_size",
    "crop_top_left"}: ImageTextTransform with the image resized to cover its nearest bucket and
    cropped to it instead of to a square."""

    def __init__(
        self,
        buckets: Sequence[Bucket],
        center_crop: bool,
        random_flip: bool,
        max_pixels: int | None = MAX_IMAGE_PIXELS,
        captions: CaptionProcessor | None = None,
    ) -> None:
        side = max(map(max, buckets))
        super().__init__(side, center_crop, random_flip, max_pixels=max_pixels, captions=captions)
        self.buckets = list(buckets)

    def precheck(self, sample: dict) -> Bucket:
        """The bucket nearest the image's shape, read from its header (no pixels decoded);
        SkipSample for what decoding would skip it for but a broken body."""
        find_caption(sample)
        return nearest_bucket(*image_size(find_image(sample), self.max_pixels), self.buckets)

    def place(
        self, width: int, height: int, rng: random.Random, bucket: Bucket | None = None
    ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """The cover-and-crop box of `bucket`, or of the bucket nearest the image's shape."""
        bucket = bucket or nearest_bucket(width, height, self.buckets)
        return bucket_crop_box(width, height, tuple(bucket), self.center_crop, rng)


class BucketBatcher:
    """Pipeline stage: examples -> batches of `batch_size` examples of one bucket, collated by
    `collate` (`transforms.Collate`).

    One instance per pipeline, so each DataLoader worker (which gets its own copy) buffers its
    own samples; the buffers persist from one pass to the next (see the module docs). A batch's
    last example is the one that filled it, the newest drawn, so its `position` says where the
    worker stands after the batch, as without buckets; on a resume the samples still waiting in
    other buckets are not drawn again (at most buckets x (batch_size - 1) per worker).
    """

    def __init__(self, batch_size: int, collate) -> None:
        self.batch_size, self.collate = batch_size, collate
        self.waiting: dict[tuple[int, ...], list[dict]] = {}

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for example in src:
            shape = tuple(example[B.PIXELS].shape)
            bucket = self.waiting.setdefault(shape, [])
            bucket.append(example)
            if len(bucket) == self.batch_size:
                self.waiting[shape] = []
                yield self.collate(bucket)


def merge_small_buckets(
    buckets: Sequence[Bucket], sizes: Sequence[tuple[int, int]], batch_size: int
) -> tuple[list[Bucket], dict[Bucket, int]]:
    """The buckets to train with on images of these (width, height) `sizes`, and {dropped bucket:
    its image count}: a bucket that fewer than `batch_size` images go to is dropped, its images
    going to the nearest bucket left, the fewest-held first (on a tie the one farthest from
    square), until every bucket holding images holds a batch or one bucket holds them all.

    A bucket of fewer images than a batch could fill its batches only with the same images
    again: one image of a shape in a batch of 4 came 4 times. Cropped to the neighbouring shape
    they train beside the others instead.
    """
    kept, dropped = list(buckets), {}
    while True:
        counts = Counter(nearest_bucket(w, h, kept) for w, h in sizes)
        small = [b for b in kept if 0 < counts[b] < batch_size]
        if not small or sum(1 for b in kept if counts[b]) < 2:
            return kept, dropped
        drop = min(small, key=lambda b: (counts[b], -abs(math.log(b[0] / b[1]))))
        kept.remove(drop)
        dropped[drop] = counts[drop]
