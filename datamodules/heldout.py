"""Held-out batches for the validation loss (`sdtrain.training.validation`): the same every time.

The held-out shards are read once, in order: no resampling, no shuffle, centre crop, no flip.
Sample i (its place in the shards) falls in block i // batch_size, and block j goes to rank
j % world_size, so a block holds the same samples whatever the number of ranks: the per-sample
losses, and with them the reduced validation loss, do not depend on how many processes ran it.
Every rank reads every tar member's bytes, but decodes only its own samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import webdataset as wds

from sdtrain.datamodules.captions import caption_processor
from sdtrain.datamodules.remote import RemoteSettings
from sdtrain.datamodules.sources import expand_shards, read_latent_cache
from sdtrain.datamodules.tars import ShardFailed, TarSamples
from sdtrain.datamodules.transforms import ImageTextTransform, LatentTransform, SkipSample

log = logging.getLogger(__name__)

INDEX = "index"  # batch key: each sample's place in the held-out shards, (B,) ints
WEIGHT = "weight"  # batch key: 1.0 for a real batch, 0.0 for a rank's padding batch


def heldout_transform(
    urls: list[str], h, train_cache: dict | None, remote: RemoteSettings | None = None
) -> ImageTextTransform | LatentTransform:
    """Raw held-out sample -> example, under the datamodule's hyperparameters `h`: centre-cropped
    and never flipped; the caption template applies (prompts look like it), no tag shuffle. A
    latent cache's tensors for one (`urls` in a cache folder); `train_cache` (the training
    shards' cache.json, or None) gives the size when `h.resolution` is null."""
    info = read_latent_cache(urls, remote)
    template = caption_processor(h.caption_template, False, 0, h.tag_separator)
    if info is not None:
        return LatentTransform(info["files"], info["dtype"], info["latent_shape"], template)
    resolution = h.resolution or (train_cache or {}).get("resolution")
    return ImageTextTransform(
        resolution, True, False, max_pixels=h.max_image_pixels, captions=template
    )


def split_heldout(
    urls: list[str],
    val_shards: str | list[str] | None,
    split: int,
    allow_pipe: bool = False,
    remote: RemoteSettings | None = None,
) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): `val_shards` expanded, or the last `split` of `urls`.

    Raises:
        ValueError: both are set, `split` is not a whole number, or it leaves no training shard.
        FileNotFoundError: `val_shards` names shards that do not exist.
    """
    if not isinstance(split, int) or isinstance(split, bool) or split < 0:
        raise ValueError(f"data.val_split_shards={split!r} must be a whole number >= 0")
    if val_shards is not None and split:
        raise ValueError(
            f"data.val_shards={val_shards!r} and data.val_split_shards={split}: set one of them"
        )
    if val_shards is not None:
        try:
            val = expand_shards(val_shards, allow_pipe, remote)
        except (ValueError, FileNotFoundError) as e:  # its message names data.train_shards
            raise type(e)(str(e).replace("data.train_shards", "data.val_shards")) from None
        return urls, val
    if split >= len(urls):
        raise ValueError(
            f"data.val_split_shards={split} holds out every one of the {len(urls)} training "
            "shard(s): hold out fewer, or name other shards in data.val_shards"
        )
    return (urls[:-split], urls[-split:]) if split else (urls, [])


def _shard_error(exn: Exception) -> bool:
    url = exn.args[-1] if isinstance(exn, ShardFailed) else "a shard"
    why = exn.args[0] if isinstance(exn, ShardFailed) else exn
    log.warning("validation data: skipped the rest of %s: %s", url, why)
    return True


class HeldOut:
    """An iterable of one rank's held-out batches, the same batches on every pass.

    A rank with fewer blocks than another repeats its last batch with weight 0, so every rank
    runs the model equally often (a rank-0-only forward would hang under FSDP).

    Args:
        urls: the held-out shards, in order.
        transform: raw sample -> example (`ImageTextTransform` without randomness, or
            `LatentTransform`); called with no generator.
        collate: examples -> batch (`Collate`).
        batch_size: samples per block.
        rank: this process's rank.
        world_size: number of processes.
        remote: how remote shards are read (`datamodules.remote`).
    """

    def __init__(
        self,
        urls: list[str],
        transform: Callable[..., dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        remote: RemoteSettings | None = None,
    ) -> None:
        self.urls, self.transform, self.collate = list(urls), transform, collate
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.remote = remote

    def _examples(self) -> Iterator[tuple[int, dict | None]]:
        """(sample index, example) in shard order; the example is None for another rank's
        sample, or for an unusable one (warned about, as training does)."""
        samples = wds.DataPipeline(
            wds.SimpleShardList(self.urls), TarSamples(_shard_error, self.remote)
        )
        for i, sample in enumerate(samples):
            if (i // self.batch_size) % self.world_size != self.rank:
                yield i, None
                continue
            try:
                example = self.transform(sample)
            except SkipSample as why:
                log.warning(
                    "validation data: skipped %s (%s): %s", sample["__key__"], why.kind, why
                )
                yield i, None
                continue
            example.update(key=sample["__key__"], skipped={}, index=i)
            yield i, example

    def _batch(self, examples: list[dict], weight: float) -> dict[str, Any]:
        batch = self.collate(examples)
        batch[INDEX] = [e[INDEX] for e in examples]
        batch[WEIGHT] = weight
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        block, pending, count, last, total = 0, [], 0, None, 0
        for i, example in self._examples():
            total = i + 1
            if i // self.batch_size != block:
                if pending:
                    last = pending
                    count += 1
                    yield self._batch(pending, 1.0)
                block, pending = i // self.batch_size, []
            if example is not None:
                pending.append(example)
        if pending:
            last = pending
            count += 1
            yield self._batch(pending, 1.0)
        blocks = -(-total // self.batch_size)
        rounds = -(-blocks // self.world_size)  # the most blocks any rank has
        if count < rounds and last is None:
            raise ValueError(
                f"validation data ({self.urls[0]}, ...): {total} samples make {blocks} batches "
                f"of {self.batch_size}, too few for {self.world_size} ranks: use more held-out "
                "samples or a smaller data.batch_size"
            )
        for _ in range(rounds - count):
            yield self._batch(last, 0.0)
