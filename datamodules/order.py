"""The data order: which shards and samples each rank and DataLoader worker reads, and in what
seeded order, so a run's order depends only on its seed, rank, worker and pass."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from sdtrain.runtime.seeds import derive_seed


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
        start_step: mixed into every seed: 0 for a new run; on a resume that cannot continue
            where the checkpoint left off (resampled shards, or another data layout) the step
            it resumes from, so it draws new data instead of replaying its first steps; on one
            that can, the value the checkpointed run used.
        rank: this process's global rank.
        world_size: number of ranks.
        worker_offset: virtual id of this rank's DataLoader worker 0 (see Cursor).
        resume: this rank's (pass, samples drawn) per virtual worker, from a checkpoint;
            empty: every worker starts at pass 0.
    """

    seed: int = 0
    start_step: int = 0
    rank: int = 0
    world_size: int = 1
    worker_offset: int = 0
    resume: tuple[tuple[int, int], ...] = ()

    def rng(self, purpose: str, passes: int, worker: int | None) -> random.Random:
        """The generator for `purpose` in pass `passes` (0 first) of DataLoader worker `worker`
        (its virtual id, `Cursor.worker`) of this rank.

        worker=None leaves rank and worker out: every rank and worker then draws the same
        numbers, which SplitByRank and SplitByWorker need to cut one shard order into parts.
        """
        parts: tuple[str | int, ...] = (purpose, self.seed, self.start_step, passes)
        if worker is not None:
            parts += (self.rank, worker)
        return random.Random(derive_seed(*parts))

    def resume_point(self, worker: int) -> tuple[int, int]:
        """(pass, samples already drawn in it) where virtual worker `worker` starts."""
        return tuple(self.resume[worker]) if worker < len(self.resume) else (0, 0)


class Cursor:
    """Where one DataLoader worker is in its data: its virtual id, its pass, and how many of the
    pass's samples it has drawn.

    One per pipeline, shared by its stages and pickled with them into each worker, so each
    worker has its own. The virtual id is the real one turned by `DataOrder.worker_offset`: the
    DataLoader takes batches from its workers in turn, starting at worker 0, so a resumed loader
    whose worker 0 plays the part of the worker that was next continues the same sequence of
    batches. `start` runs in the worker when iteration begins.
    """

    def __init__(self, order: DataOrder) -> None:
        self.order = order
        self.worker, self.workers = 0, 1
        self.passes = 0  # the pass being drawn
        self.skip = 0  # samples of this pass to pass over (drawn before a resume)
        self.started = False

    def start(self) -> None:
        if self.started:  # iterated again (a new epoch): go on with the next pass
            self.next_pass()
            return
        real, self.workers = worker_info()
        self.worker = (real + self.order.worker_offset) % self.workers
        self.passes, self.skip = self.order.resume_point(self.worker)
        self.started = True

    def next_pass(self) -> None:
        self.passes, self.skip = self.passes + 1, 0


class ShuffledShardList(IterableDataset):
    """Pipeline source: every shard once per pass, in a new order each pass.

    The order depends on (seed, start step, pass) only, so all ranks and workers agree on it and
    the splits after this stage are disjoint.
    """

    def __init__(self, urls: list[str], order: DataOrder, cursor: Cursor) -> None:
        super().__init__()
        self.urls, self.order, self.cursor = list(urls), order, cursor

    def __iter__(self) -> Iterator[dict]:
        urls = list(self.urls)
        self.order.rng("shards", self.cursor.passes, worker=None).shuffle(urls)
        for url in urls:
            yield {"url": url}


class ResampledShardList(IterableDataset):
    """Pipeline source: shards forever, each rank and worker in its own seeded order: every shard
    once per round, in a new order each round.

    Not with replacement (webdataset's ResampledShards): drawn so, ~1/e of the shards are missing
    from any stretch as long as the shard count, and others come twice. A loader mixes only the
    shards its shuffle buffer holds, so when shards are not mixes of the data (a folder sorted by
    class, written in order) each class's share of the batches then drifted for hundreds of steps
    (class shares over 50 steps from 0.02 to 0.19 where a uniform draw gives 0.09 to 0.11,
    docs/parity.md), and a model learned the rarer classes of the moment less.
    """

    def __init__(self, urls: list[str], order: DataOrder, cursor: Cursor) -> None:
        super().__init__()
        self.urls, self.order, self.cursor = list(urls), order, cursor

    def __iter__(self) -> Iterator[dict]:
        rng = self.order.rng("shards", self.cursor.passes, self.cursor.worker)
        while True:
            urls = list(self.urls)
            rng.shuffle(urls)
            for url in urls:
                yield {"url": url}


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
    """Pipeline stage: keep every n-th shard of this rank's part for worker i of n: the virtual
    worker of `cursor` (started by Endless), or without one the DataLoader's own worker."""

    def __init__(self, cursor: Cursor | None = None) -> None:
        self.cursor = cursor

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        c = self.cursor
        worker, workers = worker_info() if c is None else (c.worker, c.workers)
        yield from islice(src, worker, None, workers)


class ShuffleStage:
    """Pipeline stage: shuffle samples through a buffer, on a seed from `order`, worker and pass
    (`shared`: from `order` and pass alone, the same in every rank and worker).

    webdataset's shuffle() without a seed draws one from the pid and the wall clock: a new order
    every run, never reproducible. The buffer fills before it hands out the first sample
    (webdataset's default starts at 100: a run's first batches came from one or two shards).
    """

    def __init__(self, bufsize: int, order: DataOrder, cursor: Cursor, shared: bool = False):
        self.bufsize, self.order, self.cursor, self.shared = bufsize, order, cursor, shared

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        worker = None if self.shared else self.cursor.worker
        rng = self.order.rng("samples", self.cursor.passes, worker)
        yield from wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


class PositionStage:
    """Pipeline stage: number the samples of each pass as the shuffle hands them out, tag each
    with (worker, workers, pass, number) as `__position__`, and pass over the first
    `cursor.skip` of them (read but not decoded: the samples a resumed run had already drawn).

    Everything before this stage depends only on the seed, rank, worker and pass, so the
    number is a place in the data that a checkpoint can hold and a resume can find again.
    """

    def __init__(self, cursor: Cursor) -> None:
        self.cursor = cursor

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        c = self.cursor
        for number, sample in enumerate(src):
            if number < c.skip:
                continue
            sample["__position__"] = (c.worker, c.workers, c.passes, number)
            yield sample


class Endless(IterableDataset):
    """Iterate a per-pass pipeline pass after pass, forever, moving `cursor` on each pass.

    webdataset's `repeat()` ends the stream after a pass that yields nothing, e.g. on a rank whose
    shards that pass hold less than one batch: that rank's epoch would end while the others step
    on, and DDP would hang in its next collective. Here such a pass is just followed by the next
    one; only `max_empty` empty passes in a row (this rank's shards never fill a batch) end it,
    with an error naming the rank. A resampled pipeline's first pass never ends.
    """

    def __init__(self, pipe: Iterable, cursor: Cursor, rank: int, max_empty: int = 1000) -> None:
        super().__init__()
        self.pipe, self.cursor, self.rank, self.max_empty = pipe, cursor, rank, max_empty

    def __iter__(self) -> Iterator:
        self.cursor.start()
        empty = 0
        while empty < self.max_empty:
            count = 0
            for item in self.pipe:
                count += 1
                yield item
            empty = 0 if count else empty + 1
            self.cursor.next_pass()
        raise RuntimeError(
            f"rank {self.rank}: {self.max_empty} passes over its shards in a row gave no batch: "
            "they hold no usable sample (an image or latents, with a caption, and a mask under "
            "data.mask=file; the warnings above name the skipped ones)"
        )
