"""For the multi-process tests (tests/test_ranks.py, test_fsdp.py, test_sdxl_ranks.py): callbacks
that fail a rank, signal a process or count gradient reductions, and the check that two
strategies trained the same weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def load_start(model: Path) -> dict[str, torch.Tensor]:
    """The U-Net weights of the model folder `model`, where training started."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model, subfolder="unet").state_dict()


def assert_weights_close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> int:
    """Each of `want`'s tensors (a checkpoint's state_dict, `unet.` keys) equals `got`'s within
    fp32 summation-order noise (rtol 1e-4, atol 2e-6); returns how many moved from `start`
    (`load_start`), for the caller to check that the match is not trivial."""
    moved = 0
    for key, w in want.items():
        torch.testing.assert_close(
            got[key], w, rtol=1e-4, atol=2e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
        moved += not torch.equal(w, start[key[len("unet.") :]])
    return moved


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


class CountReductions(L.Callback):
    """Counts the gradient reductions (torch.distributed reduce-scatter and all-reduce calls)
    inside each micro-batch's backward pass, and writes them per rank to `out`/rankN.json as
    [[batch_idx, calls], ...]: a spy around the real collectives."""

    NAMES = ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter", "all_reduce")

    def __init__(self, out: str) -> None:
        self.out, self.calls, self.rows, self.at = out, 0, [], 0

    def setup(self, trainer, pl_module, stage) -> None:
        import torch.distributed as dist

        for name in self.NAMES:
            real = getattr(dist, name, None)
            if real is not None:
                setattr(dist, name, self._counted(real))

    def _counted(self, real):
        def counted(*args, **kw):
            self.calls += 1
            return real(*args, **kw)

        return counted

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.at = self.calls

    def on_after_backward(self, trainer, pl_module) -> None:
        self.rows.append([len(self.rows), self.calls - self.at])

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        Path(self.out).mkdir(parents=True, exist_ok=True)
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))
