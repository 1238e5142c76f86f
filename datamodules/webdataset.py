"""WebDataset LightningDataModule: image-text tar shards -> batches of pixels and token ids."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
import webdataset as wds

from datamodules.transforms import ImageTextTransform, SkipSample, collate
from sdtrain.models import load_tokenizer

log = logging.getLogger(__name__)


def expand_shards(urls: str | list[str]) -> list[str]:
    """Brace-expand one url pattern or a list of them ("data/{00000..00099}.tar")."""
    from braceexpand import braceexpand

    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = [u for p in patterns for part in str(p).split("::") for u in braceexpand(part)]
    if not out:
        raise ValueError(f"data.train_shards={urls!r} names no shards")
    local = [u for u in out if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).expanduser().is_file()]
    if missing:  # caught here: a stream of unreadable shards would otherwise spin forever
        raise FileNotFoundError(
            f"data.train_shards: {len(missing)} of {len(out)} shard(s) do not exist, e.g. "
            f"{', '.join(missing[:3])}"
        )
    return [str(Path(u).expanduser()) if u in local else u for u in out]


class DecodeStage:
    """Pipeline stage: apply `transform`, skipping unusable samples.

    Each example carries the number of samples skipped since the previous one; the count lives
    on the stage, so skips at the end of one pass over the shards reach the next pass's examples.
    """

    def __init__(self, transform: ImageTextTransform) -> None:
        self.transform = transform
        self.pending_skips = 0

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                example = self.transform(sample)
            except SkipSample as why:
                self.pending_skips += 1
                log.warning(
                    "skipped %s in %s: %s", sample.get("__key__"), sample.get("__url__"), why
                )
                continue
            example["skipped"], self.pending_skips = self.pending_skips, 0
            yield example


class WebDataModule(L.LightningDataModule):
    """Streams image-text samples from WebDataset shards (img2dataset layout works as is).

    Args:
        train_shards: url pattern(s), brace-expandable, local paths or anything webdataset opens.
        tokenizer: the model folder (its tokenizer/ subfolder) or a tokenizer folder.
        resolution: square training size in pixels.
        center_crop: centre crop after resizing; False crops at random.
        random_flip: flip left-right with probability 0.5.
        batch_size: per device.
        num_workers: DataLoader worker processes.
        shuffle_buffer: samples held for shuffling (per worker).
        resampled: draw shards with replacement forever, each rank and worker on its own seed
            (best for large data sets and many GPUs); False walks the shards split by node and
            worker, reshuffled and repeated every pass.
        seed: base seed for shard order.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        tokenizer: str,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = True,
        batch_size: int = 16,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.urls = expand_shards(train_shards)
        self.tokenizer = None

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        world = self.trainer.world_size if self.trainer is not None else 1
        parts = world * max(1, self.hparams.num_workers)
        if not self.hparams.resampled and len(self.urls) < parts:
            raise ValueError(
                f"data.train_shards has {len(self.urls)} shard(s) but {world} rank(s) x "
                f"{max(1, self.hparams.num_workers)} worker(s) need at least {parts} to split them; "
                "write more, smaller shards, use fewer workers, or set data.resampled=true"
            )

    def pipeline(self) -> wds.DataPipeline:
        h = self.hparams
        transform = ImageTextTransform(self.tokenizer, h.resolution, h.center_crop, h.random_flip)
        if h.resampled:
            shards = [wds.ResampledShards(self.urls, seed=h.seed, deterministic=True)]
        else:
            shards = [
                wds.SimpleShardList(self.urls, seed=h.seed),
                wds.split_by_node,
                wds.split_by_worker,
            ]
        stages = [
            *shards,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(h.shuffle_buffer),
            DecodeStage(transform),
            wds.batched(h.batch_size, collation_fn=collate, partial=False),
        ]
        pipe = wds.DataPipeline(*stages)
        return pipe if h.resampled else pipe.repeat()

    def train_dataloader(self) -> wds.WebLoader:
        workers = self.hparams.num_workers
        return wds.WebLoader(
            self.pipeline(),
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
