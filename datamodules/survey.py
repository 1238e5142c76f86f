"""What a small set of training shards holds, read once before training starts: how many usable
samples, and each image's size where aspect-ratio buckets need it.

`data.resampled=false` (the fine-tune setting, passes over a small set) uses it to size the run to
the data before anything else starts: no more DataLoader workers than a pass has batches
(`WebDataModule.loader_workers`), no bucket of fewer images than a batch
(`buckets.merge_small_buckets`), and shards without one usable sample refused with their names.
Only local shards are read, and only up to `MAX_SHARDS` of them: a larger set has batches for
every worker, and its tar headers would take long to read.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from webdataset.tariterators import base_plus_ext

from sdtrain.datamodules.buckets import Bucket, merge_small_buckets, nearest_bucket
from sdtrain.datamodules.transforms import (
    IMAGE_EXTS,
    MAX_IMAGE_PIXELS,
    SkipSample,
    find_caption,
    image_size,
)

log = logging.getLogger(__name__)

MAX_SHARDS = 64  # 64 shards of sdtrain-shards' 1000 samples: a set with batches for every worker
MAX_SAMPLES = 20_000  # and at most this many samples (img2dataset's shards hold 10000 each)
CAPTION_EXTS = ("txt", "json")


@dataclass(frozen=True)
class Survey:
    """What `survey_shards` found.

    Attributes:
        urls: the shards read.
        samples: samples with a caption and an image (or, in a latent cache, its tensors).
        sizes: (width, height) of each such image, EXIF orientation applied; empty unless asked.
    """

    urls: tuple[str, ...]
    samples: int
    sizes: tuple[tuple[int, int], ...] = ()

    @property
    def shards(self) -> int:
        return len(self.urls)


def survey_shards(
    urls: list[str], sizes: bool, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> Survey | None:
    """Read the samples of local shards `urls` (tar headers and captions; an image's header only
    where its `.json` records no width and height); None for remote urls, more than
    `MAX_SHARDS` shards or more than `MAX_SAMPLES` samples. An unreadable shard counts as far as
    it reads (training skips the rest of it too).

    Raises:
        ValueError: the shards hold no usable sample, naming them.
    """
    if len(urls) > MAX_SHARDS or any("://" in u or u.startswith("pipe:") for u in urls):
        return None
    count, found, read = 0, [], 0
    for url in urls:
        try:
            with tarfile.open(url) as tar:
                for sample in _samples(tar):
                    read += 1
                    if read > MAX_SAMPLES:
                        return None
                    size = _usable(tar, sample, sizes, max_pixels)
                    if size is not None:
                        count += 1
                        found += [size] if sizes else []
        except (tarfile.TarError, OSError) as e:
            log.warning("%s: read as far as %d samples (%s)", url, count, e)
    survey = Survey(tuple(urls), count, tuple(found))
    if count == 0:
        raise ValueError(no_samples(survey))
    return survey


def _samples(tar: tarfile.TarFile) -> Iterator[dict[str, tarfile.TarInfo]]:
    """{extension: member} per sample, grouped by key as webdataset groups them (members of one
    key in a row); headers only: tarfile seeks past the data it is not asked for."""
    key, members = None, {}
    for member in tar:
        name_key, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
        if name_key is None:
            continue
        if name_key != key and members:
            yield members
            members = {}
        key, members[ext.lower()] = name_key, member
    if members:
        yield members


def _usable(
    tar: tarfile.TarFile, members: dict, sizes: bool, max_pixels: int | None
) -> tuple[int, int] | None:
    """(width, height) of the sample's image ((0, 0) unless `sizes`), or None when training would
    skip it for its caption or image header (a latent-cache sample: for its caption alone)."""
    raw = {ext: tar.extractfile(members[ext]).read() for ext in CAPTION_EXTS if ext in members}
    try:
        find_caption(raw)
    except SkipSample:
        return None
    image = next((ext for ext in IMAGE_EXTS if ext in members), None)
    if image is None:
        return (0, 0) if len(members) > len(raw) else None  # latents beside the caption
    if not sizes:
        return (0, 0)
    recorded = _recorded_size(raw.get("json"))
    if recorded is not None:
        w, h = recorded
        return None if max_pixels is not None and w * h > max_pixels else recorded
    try:
        return image_size(tar.extractfile(members[image]).read(), max_pixels)
    except SkipSample:
        return None


def _recorded_size(data: bytes | None) -> tuple[int, int] | None:
    """The (width, height) a sample's `.json` records (sdtrain-shards: as a viewer shows the
    image; img2dataset: as stored), or None."""
    try:
        meta = json.loads(data) if data else None
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    w, h = meta.get("width"), meta.get("height")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h))
    return (w, h) if ok else None


# ---------------------------------------------------------------- sizing the run to the data


def plan_buckets(buckets: list[Bucket], survey: Survey, batch_size: int) -> list[Bucket]:
    """`buckets` less those fewer images than a batch would go to (`merge_small_buckets`),
    each drop logged."""
    kept, dropped = merge_small_buckets(buckets, survey.sizes, batch_size)
    for (w, h), n in dropped.items():
        log.info(
            "bucket %dx%d holds %d image(s), fewer than data.batch_size=%d: they train in the "
            "nearest bucket left instead (README: Your own data)", w, h, n, batch_size,
        )  # fmt: skip
    return kept


def no_samples(survey: Survey) -> str:
    return (
        f"data.train_shards: the {survey.shards} shard(s) ({', '.join(survey.urls[:3])}"
        f"{', ...' if survey.shards > 3 else ''}) hold no usable sample: an image (.jpg, .jpeg, "
        ".png, .webp) or a latent cache's tensors, with a caption (.txt, or caption/text/prompt "
        "in .json)"
    )


def batches_per_pass(survey: Survey | None, buckets: list[Bucket] | None, batch_size: int):
    """The batches one pass makes under `data.resampled=false`: each bucket's images in whole
    batches, its last one topped up (`datamodules.passes`); None when `survey` is."""
    if survey is None:
        return None
    if buckets is None:
        return -(-survey.samples // batch_size)
    counts = Counter(nearest_bucket(w, h, buckets) for w, h in survey.sizes)
    return sum(-(-n // batch_size) for n in counts.values())


def loader_workers(
    workers: int, per_pass: int | None, world_size: int, survey: Survey | None, batch_size: int,
    say: bool = False,
) -> int:  # fmt: skip
    """`workers`, but no more than a rank's share of the `per_pass` batches a pass makes: each
    worker reads every shard every pass, so one beyond them only reads the shards again before
    its batch comes. `say` logs the cap."""
    if per_pass is None or workers <= 1:
        return workers
    capped = min(workers, max(1, -(-per_pass // world_size)))
    if say and capped < workers:
        log.info(
            "%d DataLoader worker(s), not data.num_workers=%d: %d sample(s) in %d shard(s) make "
            "%d batch(es) of %d a pass, %s", capped, workers, survey.samples, survey.shards,
            per_pass, batch_size,
            "one a pass for each worker" if world_size == 1 else f"over {world_size} ranks",
        )  # fmt: skip
    return capped
