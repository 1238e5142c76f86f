"""`data.resampled=false`: passes over the data, each pass's batches formed once for the whole
group of ranks and DataLoader workers and dealt out whole.

Every loader slot (one per rank and worker) reads the same shards in the same seeded order and
shuffles them the same way, so each sees the same stream of raw (undecoded) samples. From it,
each slot forms the same batches (`GroupStage`: `data.batch_size` samples of one bucket, or of
one shape without buckets) and keeps every n-th for itself (`DealStage`), decoding only those
(`GroupDecode`). Batch j of the run (counted over passes) goes to rank j mod ranks and that
rank's worker (j // ranks) mod workers, the order in which the DataLoaders take batches from
their workers, so the group trains each pass's batches in the order they were formed, and no
image comes twice in a pass but to fill its bucket's last batch.

The last batch of each bucket in a pass is topped up with other images of that bucket from the
same pass (only a bucket of fewer images than a batch repeats one within a batch: the data
forces it), so a pass is whole batches and the next starts afresh: a batch is named by its pass
and its place in the pass, which a checkpoint holds and a resume skips to exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sdtrain.datamodules.decode import DecodeStage
from sdtrain.datamodules.order import Cursor, DataOrder, ShuffledShardList, ShuffleStage
from sdtrain.datamodules.remote import RemoteSettings
from sdtrain.datamodules.tars import TarSamples
from sdtrain.datamodules.transforms import BUCKET, SkipSample


@dataclass
class Group:
    """One batch of raw samples: its place in the pass (`index`), the samples, and the unusable
    samples read since the batch before (`rejects`), for its slot to count as skipped."""

    index: int
    samples: list[dict]
    rejects: list[dict] = field(default_factory=list)


def top_up(group: list[dict], pool: list[dict], size: int) -> list[dict]:
    """`group` filled to `size` from `pool` (the bucket's first samples this pass): samples not
    in the group first, then, for a bucket of fewer samples than `size`, the same ones again."""
    inside = {s["__key__"] for s in group}
    others = [s for s in pool if s["__key__"] not in inside] or pool
    extra = [others[i % len(others)] for i in range(size - len(group))]
    return group + extra


class GroupStage:
    """Pipeline stage: one pass's raw samples -> `Group`s of `batch_size` samples of one bucket
    (`precheck(sample)`: the bucket, or None for one shape; SkipSample for an unusable sample),
    in the order they fill, then each bucket's last batch topped up (`top_up`).

    Each sample is tagged with its bucket; a group is held back until the next one fills, so the
    rejects at the end of a pass still go out with the pass's last batch.
    """

    def __init__(self, batch_size: int, precheck: Callable[[dict], tuple | None]) -> None:
        self.batch_size, self.precheck = batch_size, precheck

    def __call__(self, src: Iterator[dict]) -> Iterator[Group]:
        size = self.batch_size
        filling: dict[tuple | None, list[dict]] = {}  # bucket -> the batch it is filling
        pools: dict[tuple | None, list[dict]] = {}  # bucket -> its first `size` samples
        held, rejects, index = None, [], 0
        for sample in src:
            try:
                bucket = self.precheck(sample)
            except SkipSample:
                rejects.append(sample)
                continue
            sample[BUCKET] = bucket
            pool = pools.setdefault(bucket, [])
            pool += [sample] if len(pool) < size else []
            group = filling.setdefault(bucket, [])
            group.append(sample)
            if len(group) == size:
                del filling[bucket]
                if held is not None:
                    yield held
                held, rejects, index = Group(index, group, rejects), [], index + 1
        for bucket, group in filling.items():  # each bucket's last batch, in the order begun
            if held is not None:
                yield held
            held, rejects = Group(index, top_up(group, pools[bucket], size), rejects), []
            index += 1
        if held is not None:
            held.rejects += rejects
            yield held


class DealStage:
    """Pipeline stage: keep this slot's `Group`s of the pass, past those a resume skips.

    Slot = virtual worker x ranks + rank; group i of pass p is batch p x `per_pass` + i of the
    run and goes to slot (that number) mod slots. `per_pass` is the batches a pass makes (from
    `survey.Survey`); unknown (None), each pass starts the deal at a seeded slot instead, which
    keeps the slots' shares even though the passes' batches then interleave at pass ends.
    """

    def __init__(
        self, rank: int, world_size: int, batch_size: int, per_pass: int | None, order: DataOrder,
        cursor: Cursor,
    ) -> None:  # fmt: skip
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.per_pass, self.order, self.cursor = per_pass, order, cursor

    def __call__(self, groups: Iterator[Group]) -> Iterator[Group]:
        c = self.cursor
        slots = self.world_size * c.workers
        slot = c.worker * self.world_size + self.rank
        if self.per_pass:
            turn = c.passes * self.per_pass % slots
        else:
            turn = self.order.rng("deal", c.passes, worker=None).randrange(slots)
        for group in groups:
            drawn = (group.index + 1) * self.batch_size  # the pass's samples through this batch
            if (group.index + turn) % slots == slot and drawn > c.skip:
                yield group


class GroupDecode:
    """Pipeline stage: `Group` -> a batch: its rejects counted as skipped (`decode`), its samples
    decoded, each at its place in the pass (the crop and flip draw from it), and collated.

    The batch's `position` is where the pass stands after the whole group, also when its last
    samples did not decode (the batch is then smaller): a resume goes on after it. A group of
    which nothing decodes gives no batch.
    """

    def __init__(self, decode: DecodeStage, collate: Callable, batch_size: int, cursor: Cursor):
        self.decode, self.collate, self.batch_size, self.cursor = (
            decode,
            collate,
            batch_size,
            cursor,
        )

    def __call__(self, groups: Iterator[Group]) -> Iterator[dict]:
        c, size = self.cursor, self.batch_size
        for group in groups:
            samples = [
                dict(s, __position__=(c.worker, c.workers, c.passes, group.index * size + k))
                for k, s in enumerate(group.samples)
            ]
            examples = list(self.decode(iter(group.rejects + samples)))
            if not examples:
                continue
            batch = self.collate(examples)
            batch["position"] = [c.worker, c.workers, c.passes, (group.index + 1) * size]
            yield batch


def pass_stages(
    urls: list[str], order: DataOrder, cursor: Cursor, decode: DecodeStage, collate: Callable,
    batch_size: int, shuffle_buffer: int, per_pass: int | None, samples: list | None = None,
    remote: RemoteSettings | None = None,
) -> list:  # fmt: skip
    """One pass's pipeline stages for this rank's slot: the shards in the pass's order, read
    and shuffled alike in every slot, formed into batches (`GroupStage`, on `decode`'s
    transform's `precheck`), this slot's dealt to it (`DealStage`; `per_pass`: the batches a
    pass makes, or None) and decoded (`GroupDecode`). `samples` replaces the first three stages
    with others that give a pass's raw samples alike in every slot (a mixture's,
    `datamodules.mixture.MixedSamples`). `remote`: how remote shards are read."""
    read = samples or [
        ShuffledShardList(urls, order, cursor),
        TarSamples(decode.shard_error, remote),
        ShuffleStage(shuffle_buffer, order, cursor, shared=True),
    ]
    return [
        *read,
        GroupStage(batch_size, decode.transform.precheck),
        DealStage(order.rank, order.world_size, batch_size, per_pass, order, cursor),
        GroupDecode(decode, collate, batch_size, cursor),
    ]
