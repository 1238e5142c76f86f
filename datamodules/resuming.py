"""Where a WebDataModule's data order starts: rank, start step, a checkpoint's data position."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

from sdtrain.datamodules.order import DataOrder

log = logging.getLogger("sdtrain.datamodules.webdataset")  # where its messages always came from


class ResumableOrder:
    """A mixin of `WebDataModule`. Needs from it: `hparams` (seed, resampled, batch_size,
    shuffle_buffer), `urls`, `buckets`, `mixture`, `loader_workers()`, Lightning's `trainer`, and
    `_rank`, `_start_step`, `_resume` set to None in its `__init__`."""

    def set_rank(self, rank: int, world_size: int) -> None:
        """Use this rank and world size instead of the trainer's (a loader built without one)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self._rank = (rank, world_size)

    def set_start_step(self, step: int) -> None:
        """Use this start step instead of the trainer's global_step (a resume without a trainer)."""
        self._start_step = step

    def data_order(self) -> DataOrder:
        """Seed, start step, rank, world size and resume point for the next train_dataloader().

        Taken from the trainer unless set_rank/set_start_step fixed them; (rank 0 of 1, step 0)
        without one. Lightning restores a checkpoint (and with it `resume_at`) before it asks
        for the train dataloader, so global_step is the resumed run's first step there.
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
        order = DataOrder(seed=self.hparams.seed, start_step=step, rank=rank, world_size=world)
        at = self._resume_point(rank, world)
        if at is None:
            return order
        start_step, offset, resume = at
        return replace(order, start_step=start_step, worker_offset=offset, resume=resume)

    @property
    def keeps_position(self) -> bool:
        """Whether checkpoints keep the data position (`DataPosition`): not for resampled shards,
        which a resumed run draws anew."""
        return not self.hparams.resampled

    def layout(self, world_size: int | None = None) -> dict:
        """What a data position means only under: the shards, how they are split and batched."""
        h = self.hparams
        world = self.data_order().world_size if world_size is None else world_size
        return {
            "shards": hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16],
            "num_shards": len(self.urls),
            "seed": h.seed,
            "resampled": h.resampled,
            "batch_size": h.batch_size,
            "shuffle_buffer": h.shuffle_buffer,
            "workers": max(1, self.loader_workers(world)),
            "world_size": world,
            "buckets": None if self.buckets is None else [list(b) for b in self.buckets],
            # what a position counts: the samples through a batch of the pass's whole batches
            # (datamodules/passes.py); a checkpoint from before counted each worker's own draws
            "deal": None if h.resampled else "batches",
            "sources": None if self.mixture is None else self.mixture.layout(),
        }

    def resume_at(self, position: dict) -> None:
        """Continue from a checkpoint's data position (`DataPosition.state_dict`) when the
        layout allows; train_dataloader() then starts every worker where it left off."""
        self._resume = position

    def _resume_point(self, rank: int, world: int) -> tuple | None:
        """(start step, worker offset, (pass, drawn) per worker) for this rank, or None (and a
        warning naming why) when the restored position cannot be continued."""
        position = self._resume
        if not position:
            return None
        if self.hparams.resampled:
            log.info(
                "data.resampled=true draws shards with replacement: the resumed run draws anew "
                "(set data.resampled=false to continue each pass where it stopped)"
            )
            return None
        saved, now = position.get("layout") or {}, self.layout(world)
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
        if changed:
            log.warning(
                "the checkpoint's data position cannot be continued (%s): the data order "
                "starts anew, so some samples of this pass may repeat or be missed",
                "; ".join(changed),
            )
            return None
        row = position["ranks"][rank]
        return int(position["start_step"]), int(row["next_worker"]), tuple(map(tuple, row["at"]))
