"""Non-finite steps: an optimizer step whose gradients hold a NaN or inf is skipped on every rank.

A NaN loss (a poisoned batch, an overflow, a learning rate far too high) trained through would
write NaN into every weight, the EMA and each checkpoint after it. Instead the step's gradients are
checked after backward (after the DDP all-reduce, before clipping and the optimizer): when any
rank's are non-finite, every rank drops them together (the flag is summed over ranks, so FSDP's
sharded gradients agree too), the optimizer leaves weights and moments alone (PyTorch optimizers
skip a parameter whose `.grad` is None), and the EMA is not updated. `max_in_a_row` such steps in a
row stop the run with an error; the last checkpoint written before them holds finite weights.

The check is one fused norm over the gradients and one host sync per optimizer step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from sdtrain import sharding

log = logging.getLogger(__name__)


class NonFiniteStepError(RuntimeError):
    pass


class NonFiniteGuard:
    """Counts skipped steps (`total`, kept in checkpoints) and the current run of them."""

    def __init__(self, max_in_a_row: int = 10) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"model.max_nonfinite_in_a_row={max_in_a_row} must be at least 1")
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0

    def check(
        self,
        params: Iterable[torch.nn.Parameter],
        step: int,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> bool:
        """True when this step must be skipped; then the gradients are dropped (set to None)."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return False
        # one fused kernel; under FSDP each rank checks its shard (the reduce covers them all)
        norms = torch._foreach_norm([sharding.local(p.grad) for p in params])
        bad = (~torch.isfinite(torch.stack(norms))).any().float()
        if reduce_sum is not None:  # any rank's bad step is every rank's
            bad = reduce_sum(bad)
        if bad.item() == 0:
            self.in_a_row = 0
            return False
        for p in params:
            p.grad = None
        self.total += 1
        self.in_a_row += 1
        log.warning(
            "step %d: non-finite gradients (NaN or inf); update skipped on every rank "
            "(%d in a row, %d in all)",
            step,
            self.in_a_row,
            self.total,
        )
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteStepError(
                f"{self.in_a_row} optimizer steps in a row (to step {step}) had non-finite "
                f"gradients (NaN or inf), so the run stops (model.max_nonfinite_in_a_row="
                f"{self.max_in_a_row}). Weights are unchanged since the last finite step; lower "
                "model.optimizer.lr, check the data, or resume from the last checkpoint."
            )
        return True
