"""A callback that fails one rank at one step, for the multi-process tests (tests/test_ranks.py)."""

from __future__ import annotations

import lightning as L


class RaiseAt(L.Callback):
    def __init__(self, rank: int = 1, step: int = 3) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            raise RuntimeError(f"boom on rank {self.rank} at step {trainer.global_step}")


class SignalAt(L.Callback):
    """Sends this process `signal` (default SIGTERM) at the end of micro-batch `batch`."""

    def __init__(self, batch: int = 5, signal: str = "SIGTERM") -> None:
        self.batch, self.signal = batch, signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            import os
            import signal as signals

            os.kill(os.getpid(), getattr(signals, self.signal))
