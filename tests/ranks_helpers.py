"""A callback that fails one rank at one step, for the multi-process tests (tests/test_ranks.py)."""

from __future__ import annotations

import lightning as L


class RaiseAt(L.Callback):
    def __init__(self, rank: int = 1, step: int = 3) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            raise RuntimeError(f"boom on rank {self.rank} at step {trainer.global_step}")
