"""The data position: where each rank's DataLoader workers stand in the data, kept in every
checkpoint, so a resumed run goes on with the samples it had not yet trained on.

Each batch says where its worker stands after it (`sdtrain.datamodules.batch.POSITION`: the worker's virtual
id, the worker count, its pass over the shards and the samples it has drawn in that pass). The
`DataPosition` callback keeps the latest of these per rank and worker, for batches whose
optimizer step has completed, summed over ranks once per optimizer step so that rank 0, which
writes the checkpoint, holds every rank's. On resume it hands the saved position to the datamodule
(`WebDataModule.resume_at`), whose workers then read past what was drawn (without decoding it)
and continue: over a pass, no sample is lost or repeated.

This holds with `data.resampled=false` and an unchanged data layout (shards, seed, batch size,
shuffle buffer, workers, ranks). Resampled shards are drawn with replacement, so a resume draws
anew; a changed layout starts a new order with a warning.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from sdtrain.datamodules.batch import POSITION
from sdtrain.runtime import devices


class DataPosition(Callback):
    """Keeps the data position of every rank and worker in the checkpoint (see module docs)."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, list[int]]] = []  # (global step when drawn, position)
        self.mine: dict[str, Any] | None = (
            None  # this rank's {"next_worker", "at": [[pass, drawn]]}
        )
        self.table: torch.Tensor | None = None  # every rank's row, encoded (see `encode`)
        self.restored: dict[str, Any] | None = None
        self.trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer

    # ------------------------------------------------------------------ resume

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = state_dict or None
        if self.trainer is not None:  # restored after on_fit_start (FSDP restores after setup)
            self.hand_over(self.trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the checkpoint is restored (DDP, one device), before the dataloader is built."""
        self.hand_over(trainer)

    def hand_over(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        if self.restored and hasattr(dm, "resume_at"):
            dm.resume_at(self.restored)

    # ------------------------------------------------------------------ tracking

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if not getattr(trainer.datamodule, "keeps_position", True):
            return  # resampled shards: a resume draws anew, so no position is kept or shared
        position = batch.get(POSITION) if isinstance(batch, dict) else None
        if position is not None:
            self.pending.append((trainer.global_step, [int(v) for v in position]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        """Take in the batches whose optimizer step is done (all micro-batches of a completed
        accumulation), then share this rank's row with the others: once per optimizer step, on
        the last micro-batch of its window, which every rank reaches together (the same step
        count), so the collective lines up."""
        done = [p for step, p in self.pending if step < trainer.global_step]
        self.pending = [(s, p) for s, p in self.pending if s >= trainer.global_step]
        if not done:
            return  # inside an accumulation window (or nothing tracked): nothing new to share
        if self.mine is None:
            self.mine = self.start_row(trainer, workers=done[0][1])
        for worker, workers, passes, drawn in done:
            self.mine["at"][worker] = [passes, drawn]
            self.mine["next_worker"] = (worker + 1) % workers
        self.table = self.gather(trainer)

    def start_row(self, trainer: L.Trainer, workers: list[int] | int) -> dict[str, Any]:
        """This rank's row as the run started: the resumed position, or the start of pass 0."""
        n = workers[1] if isinstance(workers, list) else workers
        order = getattr(trainer.datamodule, "order", None)
        if order is None:
            return {"next_worker": 0, "at": [[0, 0] for _ in range(n)]}
        return {
            "next_worker": order.worker_offset % n,
            "at": [list(order.resume_point(w)) for w in range(n)],
        }

    def gather(self, trainer: L.Trainer) -> torch.Tensor:
        """(world, 1 + 2 * workers) int64: each rank's row, summed into place over all ranks."""
        row = torch.tensor(encode(self.mine), dtype=torch.int64)
        world, rank = trainer.world_size, trainer.global_rank
        if world == 1:
            return row[None]
        table = torch.zeros(world, row.numel(), dtype=torch.int64)
        table[rank] = row
        table = devices.to_device(table, trainer.strategy.root_device)  # no host sync per step
        return trainer.strategy.reduce(table, reduce_op="sum")

    # ------------------------------------------------------------------ saving

    def state_dict(self) -> dict[str, Any]:
        dm = self.trainer.datamodule if self.trainer is not None else None
        order = getattr(dm, "order", None)
        if self.table is None or order is None or not hasattr(dm, "layout"):
            return dict(self.restored or {})  # nothing drawn since a resume: keep its position
        return {
            "layout": dm.layout(order.world_size),
            "start_step": int(order.start_step),
            "ranks": [decode(r) for r in self.table.cpu().tolist()],
        }


def encode(row: dict[str, Any]) -> list[int]:
    """{"next_worker": w, "at": [[pass, drawn], ...]} -> [w, pass0, drawn0, pass1, drawn1, ...]."""
    return [row["next_worker"], *(v for at in row["at"] for v in at)]


def decode(values: list[int]) -> dict[str, Any]:
    """The inverse of `encode`."""
    at = values[1:]
    return {"next_worker": values[0], "at": [at[i : i + 2] for i in range(0, len(at), 2)]}
