"""A mixture's weighted draw: raw samples picked by weight from its sources' streams."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import accumulate

import webdataset as wds
from torch.utils.data import IterableDataset

from sdtrain.datamodules.mixture_counts import SourceShardError
from sdtrain.datamodules.mixture_spec import SOURCE, Source
from sdtrain.datamodules.order import (
    Cursor,
    DataOrder,
    ResampledShardList,
    ShuffledShardList,
    ShuffleStage,
)
from sdtrain.runtime.seeds import derive_seed


def tar_samples(handler: Callable[[Exception], bool]):
    """The stage that reads shards' urls into raw samples: webdataset's tar reader, on `handler`
    for a shard that fails."""
    return wds.tarfile_to_samples(handler=handler)


class MixedSamples(IterableDataset):
    """Pipeline source: raw samples drawn from the sources by weight, each tagged with its source
    (`SOURCE`); see `datamodules.mixture`'s docs for what happens when a source runs out.

    `shared=False` (data.resampled=true): every source an endless stream of this worker's
    (`ResampledShardList`), drawn in an order seeded by rank and worker too. `shared=True`
    (data.resampled=false): one pass (`cursor.passes`) of the mixture, the same in every rank and
    worker (`datamodules.passes` forms and deals its batches).
    """

    def __init__(
        self, sources: list[Source], order: DataOrder, cursor: Cursor, pending: Counter,
        shard_error: Callable[[Exception], bool], shuffle_buffer: int, shared: bool,
        read: Callable = tar_samples,
    ) -> None:  # fmt: skip
        super().__init__()
        self.sources, self.order, self.cursor = list(sources), order, cursor
        self.pending, self.shard_error, self.read = pending, shard_error, read
        self.shuffle_buffer, self.shared = shuffle_buffer, shared
        self.bounds = list(accumulate(s.weight for s in sources))  # cumulative weights

    def stream(self, source: Source, round_: int) -> Iterator[dict]:
        """One source's raw samples: a round of its shards (an endless one unless `shared`),
        read and shuffled as a single source's are, on a seed of its own."""
        seed = derive_seed("source", self.order.seed, source.name, round_)
        order = replace(self.order, seed=seed)
        shards = ShuffledShardList if self.shared else ResampledShardList
        handler = SourceShardError(source.name, self.pending, self.shard_error)
        pipe = wds.DataPipeline(
            shards(list(source.urls), order, self.cursor),
            self.read(handler),
            ShuffleStage(self.shuffle_buffer, order, self.cursor, shared=self.shared),
        )
        for sample in pipe:
            sample[SOURCE] = source.name
            yield sample

    def pick(self, rng, alive: set[int]) -> int:
        """A source index drawn by weight among `alive` (drawn again while a dead one comes)."""
        while True:
            i = bisect.bisect_right(self.bounds, rng.random() * self.bounds[-1])
            i = min(i, len(self.bounds) - 1)  # random() * total can round up to the total
            if i in alive:
                return i

    def __iter__(self) -> Iterator[dict]:
        c = self.cursor
        rng = self.order.rng("mix", c.passes, None if self.shared else c.worker)
        n = len(self.sources)
        streams: list[Iterator[dict] | None] = [None] * n  # started when first drawn
        rounds, ran_out, alive = [0] * n, set(), set(range(n))
        while alive:
            i = self.pick(rng, alive)
            if streams[i] is None:
                streams[i] = self.stream(self.sources[i], rounds[i])
            sample = next(streams[i], None)
            if sample is None:  # only a shared pass's rounds end
                ran_out.add(i)
                if ran_out >= alive:
                    return  # every source read to its end: the pass is over
                rounds[i] += 1
                streams[i] = self.stream(self.sources[i], rounds[i])
                sample = next(streams[i], None)
                if sample is None:  # a round gives nothing: its shards hold no sample
                    alive.discard(i)
                    if ran_out >= alive:
                        return
                    continue
            yield sample
