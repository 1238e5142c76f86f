"""The data order: which shards and samples each rank and DataLoader worker reads, and in what
seeded order, so a run's order depends only on its seed, rank, worker and pass."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from sdtrain.seeds import derive_seed


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


class Endless(IterableDataset):
    """Iterate a per-pass pipeline pass after pass, forever.

    webdataset's `repeat()` ends the stream after a pass that yields nothing, e.g. on a rank whose
    shards that pass hold less than one batch: that rank's epoch would end while the others step
    on, and DDP would hang in its next collective. Here such a pass is just followed by the next
    one; only `max_empty` empty passes in a row (this rank's shards never fill a batch) end it,
    with an error naming the rank.
    """

    def __init__(self, pipe: Iterable, rank: int, max_empty: int = 1000) -> None:
        super().__init__()
        self.pipe, self.rank, self.max_empty = pipe, rank, max_empty

    def __iter__(self) -> Iterator:
        empty = 0
        while empty < self.max_empty:
            count = 0
            for item in self.pipe:
                count += 1
                yield item
            empty = 0 if count else empty + 1
        raise RuntimeError(
            f"rank {self.rank}: {self.max_empty} passes over its shards in a row gave no batch; "
            "its shards (or this DataLoader worker's share) hold fewer usable samples than "
            "data.batch_size: use more shards, a smaller batch, or data.resampled=true"
        )
