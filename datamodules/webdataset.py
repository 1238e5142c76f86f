"""WebDataset LightningDataModule: image-text tar shards -> batches of pixels and token ids."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from sdtrain.datamodules.transforms import Collate, ImageTextTransform, SkipSample
from sdtrain.models import load_tokenizer
from sdtrain.seeds import derive_seed

log = logging.getLogger(__name__)


def expand_shards(urls: str | list[str]) -> list[str]:
    """The shard list that `data.train_shards` names, in order.

    Each entry (one string or a list; "a::b" also separates) is brace-expanded
    ("/data/{00000..00099}.tar"). A local entry may also be a folder (every `*.tar` in it,
    sorted) or a glob ("/data/*.tar", sorted). Remote urls ("s3://...", "https://...") and
    "pipe:" commands pass through as webdataset opens them.

    Raises:
        FileNotFoundError: a folder holds no `*.tar`, a glob matches nothing, or local shards do
            not exist (caught here: a stream of unreadable shards would otherwise spin forever).
        ValueError: nothing is named at all.
    """
    import glob

    from braceexpand import braceexpand

    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    missing: list[str] = []
    for url in (u for p in patterns for part in str(p).split("::") for u in braceexpand(part)):
        if "://" in url or url.startswith("pipe:"):
            out.append(url)
            continue
        path = Path(url).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar") if p.is_file())
            if not found:
                raise FileNotFoundError(f"data.train_shards: folder {path} holds no *.tar shards")
        elif glob.has_magic(str(path)):
            found = sorted(p for p in glob.glob(str(path)) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"data.train_shards: {path} matches no files")
        else:
            found = [str(path)]
            missing += [] if path.is_file() else found
        out += found
    if not out:
        raise ValueError(f"data.train_shards={urls!r} names no shards")
    if missing:
        raise FileNotFoundError(
            f"data.train_shards: {len(missing)} of {len(out)} shard(s) do not exist, e.g. "
            f"{', '.join(missing[:3])}"
        )
    return out


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
            example["key"] = sample["__key__"]  # which sample it was: data-order tests, debugging
            example["skipped"], self.pending_skips = self.pending_skips, 0
            yield example


def worker_info() -> tuple[int, int]:
    """(worker id, worker count) of the calling DataLoader worker; (0, 1) outside one.

    torch sets this in each worker however it was started (fork, spawn, forkserver), unlike the
    environment variables and torch.distributed state that webdataset's split_by_node reads.
    """
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass(frozen=True)
class DataOrder:
    """What shard order and shuffling depend on, fixed in the trainer process.

    Plain values, so they pickle into DataLoader workers however those are started. The worker
    id and the pass number are read where the data is drawn, inside the worker.

    Args:
        seed: the run's base seed (data.seed).
        start_step: the optimizer step the run starts from (the checkpoint's step on resume), so
            a resumed run draws new data instead of replaying its first steps.
        rank: this process's global rank.
        world_size: number of ranks.
    """

    seed: int = 0
    start_step: int = 0
    rank: int = 0
    world_size: int = 1

    def rng(self, purpose: str, passes: int, per_worker: bool = True) -> random.Random:
        """The generator for `purpose` in pass `passes` (0 first) of the calling worker.

        per_worker=False leaves rank and worker out: every rank and worker then draws the same
        numbers, which SplitByRank and SplitByWorker need to cut one shard order into parts.
        """
        parts: tuple[str | int, ...] = (purpose, self.seed, self.start_step, passes)
        if per_worker:
            parts += (self.rank, worker_info()[0])
        return random.Random(derive_seed(*parts))


class ShuffledShardList(IterableDataset):
    """Pipeline source: every shard once per pass, in a new order each pass.

    The order depends on (seed, start step, pass) only, so all ranks and workers agree on it and
    the splits after this stage are disjoint. The pass count lives on this object, which each
    persistent worker keeps, so pass 2 is shuffled apart from pass 1.
    """

    def __init__(self, urls: list[str], order: DataOrder) -> None:
        super().__init__()
        self.urls = list(urls)
        self.order = order
        self.passes = 0

    def __iter__(self) -> Iterator[dict]:
        urls = list(self.urls)
        self.order.rng("shards", self.passes, per_worker=False).shuffle(urls)
        self.passes += 1
        for url in urls:
            yield {"url": url}


class ResampledShardList(IterableDataset):
    """Pipeline source: shards drawn with replacement forever, on each rank and worker's own seed."""

    def __init__(self, urls: list[str], order: DataOrder) -> None:
        super().__init__()
        self.urls = list(urls)
        self.order = order
        self.passes = 0  # > 0 only if the loader is iterated again (a new epoch)

    def __iter__(self) -> Iterator[dict]:
        rng = self.order.rng("shards", self.passes)
        self.passes += 1
        while True:
            yield {"url": rng.choice(self.urls)}


class SplitByRank:
    """Pipeline stage: keep every `world_size`-th shard, starting at `rank`.

    Rank and world size are attributes set in the trainer process and pickled with the pipeline.
    webdataset's split_by_node looks them up inside the worker (RANK/WORLD_SIZE or
    torch.distributed); a spawned worker has neither under Lightning's DDP, and then every rank
    reads every shard.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        yield from islice(src, self.rank, None, self.world_size)


class SplitByWorker:
    """Pipeline stage: keep every n-th shard of this rank's part for DataLoader worker i of n."""

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        worker, workers = worker_info()
        yield from islice(src, worker, None, workers)


class ShuffleStage:
    """Pipeline stage: shuffle samples through a buffer, on a seed from `order`, worker and pass.

    webdataset's shuffle() without a seed draws one from the pid and the wall clock: a new order
    every run, never reproducible.
    """

    def __init__(self, bufsize: int, order: DataOrder) -> None:
        self.bufsize = bufsize
        self.order = order
        self.passes = 0

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rng = self.order.rng("samples", self.passes)
        self.passes += 1
        yield from wds.shuffle(self.bufsize, rng=rng)(src)


class WebDataModule(L.LightningDataModule):
    """Streams image-text samples from WebDataset shards (img2dataset layout works as is).

    Args:
        train_shards: url pattern(s), brace-expandable, local paths or anything webdataset opens.
        tokenizer: the model folder (its tokenizer/ subfolder) or a tokenizer folder.
        resolution: square training size in pixels.
        center_crop: centre crop after resizing; False crops at random.
        random_flip: flip left-right with probability 0.5 (off by default: a mirrored glyph,
            text or asymmetric subject no longer matches its caption).
        batch_size: per device.
        num_workers: DataLoader worker processes.
        shuffle_buffer: samples held for shuffling (per worker).
        resampled: draw shards with replacement forever, each rank and worker on its own seed
            (best for large data sets and many GPUs); False walks the shards split by rank and
            worker, in a new order every pass, repeated forever.
        seed: base seed for shard order and shuffling, which also depend on the rank, the
            DataLoader worker, the pass over the shards and the step the run starts from (see
            DataOrder): a resumed run draws new data rather than replaying its first steps.
        worker_start_method: how DataLoader workers start ("fork", "spawn", "forkserver"); None
            keeps Python's default (fork on Linux up to 3.13, forkserver from 3.14).
    """

    def __init__(
        self,
        train_shards: str | list[str],
        tokenizer: str,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        batch_size: int = 16,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
        worker_start_method: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.urls = expand_shards(train_shards)
        self.tokenizer = None
        self._rank: tuple[int, int] | None = None  # (rank, world size) from set_rank
        self._start_step: int | None = None  # from set_start_step

    def set_rank(self, rank: int, world_size: int) -> None:
        """Use this rank and world size instead of the trainer's (a loader built without one)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self._rank = (rank, world_size)

    def set_start_step(self, step: int) -> None:
        """Use this start step instead of the trainer's global_step (a resume without a trainer)."""
        self._start_step = step

    def data_order(self) -> DataOrder:
        """Seed, start step, rank and world size for the next train_dataloader().

        Taken from the trainer unless set_rank/set_start_step fixed them; (rank 0 of 1, step 0)
        without one. Lightning restores a checkpoint before it asks for the train dataloader, so
        global_step is the resumed run's first step there.
        """
        if self._rank is not None:
            rank, world = self._rank
        elif self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        else:
            rank, world = 0, 1
        if self._start_step is not None:
            step = self._start_step
        else:
            step = self.trainer.global_step if self.trainer is not None else 0
        return DataOrder(seed=self.hparams.seed, start_step=step, rank=rank, world_size=world)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        world = self.data_order().world_size
        parts = world * max(1, self.hparams.num_workers)
        if not self.hparams.resampled and len(self.urls) < parts:
            raise ValueError(
                f"data.train_shards has {len(self.urls)} shard(s) but {world} rank(s) x "
                f"{max(1, self.hparams.num_workers)} worker(s) need at least {parts} to split them; "
                "write more, smaller shards, use fewer workers, or set data.resampled=true"
            )

    def pipeline(self, order: DataOrder | None = None) -> wds.DataPipeline:
        """Shards -> samples -> batches for one rank; `order` defaults to data_order()."""
        h = self.hparams
        order = self.data_order() if order is None else order
        transform = ImageTextTransform(h.resolution, h.center_crop, h.random_flip)
        if h.resampled:
            shards = [ResampledShardList(self.urls, order)]
        else:
            shards = [
                ShuffledShardList(self.urls, order),
                SplitByRank(order.rank, order.world_size),
                SplitByWorker(),
            ]
        stages = [
            *shards,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            ShuffleStage(h.shuffle_buffer, order),
            DecodeStage(transform),
            wds.batched(h.batch_size, collation_fn=Collate(self.tokenizer), partial=False),
        ]
        pipe = wds.DataPipeline(*stages)
        return pipe if h.resampled else pipe.repeat()

    def train_dataloader(self) -> wds.WebLoader:
        order = self.data_order()  # read now: on resume the trainer has just restored its step
        log.info(
            "data order: seed %d, start step %d, rank %d of %d",
            order.seed,
            order.start_step,
            order.rank,
            order.world_size,
        )
        workers = self.hparams.num_workers
        return wds.WebLoader(
            self.pipeline(order),
            batch_size=None,
            num_workers=workers,
            # persistent: each worker keeps its pipeline, and with it the pass counts
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # DataLoader refuses a start method when there are no worker processes
            multiprocessing_context=self.hparams.worker_start_method if workers > 0 else None,
        )
