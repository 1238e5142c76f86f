"""Non-finite steps: an optimizer step whose gradients hold a NaN or inf is skipped on every rank.

A NaN loss (a poisoned batch, an overflow, a learning rate far too high) trained through would
write NaN into every weight, the EMA and each checkpoint after it. Instead the step's gradients are
checked after backward (after the DDP all-reduce, before clipping and the optimizer): when any
rank's are non-finite, every rank drops them together (the flag is summed over ranks, so FSDP's
sharded gradients agree too), the optimizer leaves weights and moments alone (PyTorch optimizers
skip a parameter whose `.grad` is None), and the EMA is not updated. `max_in_a_row` such steps in a
row stop the run with an error; the last checkpoint written before them holds finite weights.

The check is one fused norm over the gradients and one host sync per optimizer step. With an
optimizer that can skip its own update on the device (fused AdamW, Adam, SGD, Adagrad: those with
`_step_supports_amp_scaling`, as GradScaler uses them) the sync goes too (`flag`): the flag is
handed to the optimizer as its `found_inf`, the EMA's lerp weight is multiplied by 1 - flag, and the
counts stay on the device until `settle` reads them at each logging window. A sync a step makes the
GPU wait while the CPU launches the next step's work (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from sdtrain.runtime import devices
from sdtrain.training import sharding

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
        self._pending: torch.Tensor | None = None  # on the device: [new bad steps, in a row, last]
        self.norm: torch.Tensor | None = None  # the last check's total gradient norm (this rank's)

    def check(
        self,
        params: Iterable[torch.nn.Parameter],
        step: int,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> bool:
        """True when this step must be skipped; then the gradients are dropped (set to None)."""
        self.norm = None
        params = [p for p in params if p.grad is not None]
        if not params:
            return False
        bad, self.norm = _bad(params, reduce_sum)
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
            raise self._stop(self.in_a_row, step)
        return True

    def flag(
        self,
        params: Iterable[torch.nn.Parameter],
        step: int,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """The sync-free check: a 0-d float32 tensor on the gradients' device, 1.0 when any rank's
        gradients hold a NaN or inf (an optimizer's `found_inf`); nothing is dropped or read back.
        The counts are kept on the device until `settle`."""
        self.norm = None
        params = [p for p in params if p.grad is not None]
        if not params:
            return None
        bad, self.norm = _bad(params, reduce_sum)
        if self._pending is None or self._pending.device != bad.device:
            self._pending = torch.zeros(3, device=bad.device)
        pending = self._pending
        pending[0] += bad
        pending[1] = (pending[1] + bad) * bad  # back to 0 at a finite step
        pending[2] = torch.where(bad > 0, float(step), pending[2])
        return bad

    def pending_total(self, device: torch.device) -> torch.Tensor:
        """`total` with the steps `settle` has not read yet, as a tensor (no sync)."""
        total = devices.scalar(self.total, device)
        return total if self._pending is None else total + self._pending[0].to(device)

    def settle(self, step: int, stop: bool = True) -> None:
        """Read the device's counts (one sync): warn about the steps skipped since the last read,
        and stop the run past `max_in_a_row` in a row (checked here, so up to one logging window
        later than the synchronous check would)."""
        if self._pending is None:
            return
        new, row, last = (int(v) for v in self._pending.tolist())
        self._pending[0].zero_()  # in place on the device: no host-to-device copy
        self.in_a_row = row
        if not new:
            return
        self.total += new
        log.warning(
            "steps to %d: %d optimizer steps had non-finite gradients (NaN or inf), the last at "
            "step %d; their updates were skipped on every rank (%d in a row, %d in all)",
            step,
            new,
            last,
            row,
            self.total,
        )
        if stop and row >= self.max_in_a_row:
            raise self._stop(row, last)

    def _stop(self, in_a_row: int, step: int) -> NonFiniteStepError:
        return NonFiniteStepError(
            f"{in_a_row} optimizer steps in a row (to step {step}) had non-finite gradients (NaN "
            f"or inf), so the run stops (model.max_nonfinite_in_a_row={self.max_in_a_row}). "
            "Weights are unchanged since the last finite step; lower model.optimizer.lr, check "
            "the data, or resume from the last checkpoint."
        )


def _bad(
    params: list[torch.nn.Parameter], reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """1.0 (a 0-d float32 tensor on the device) when any rank's gradients hold a NaN or inf, and
    this rank's total gradient norm: one fused norm kernel; under FSDP each rank checks its shard
    (the sum covers them all). A NaN or inf in any gradient makes the total NaN or inf (so does
    a total past float32's range, a step clipping would have zeroed)."""
    total = _total_norm([sharding.local(p.grad) for p in params])
    bad = (~torch.isfinite(total)).float()
    if reduce_sum is not None:  # any rank's bad step is every rank's
        bad = (reduce_sum(bad) > 0).float()
    return bad, total


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of them together, as `clip_grad_norm_` computes it: one fused kernel."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_with_norm(
    params: Iterable[torch.nn.Parameter], max_norm: float, total: torch.Tensor | None
) -> None:
    """`torch.nn.utils.clip_grad_norm_`, with its total norm already known when `total` is given
    (the check's `norm`), so the gradients are read once a step, not twice; the same arithmetic,
    no sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        if total is None:
            total = _total_norm(grads)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))


def skips_on_device(optimizer, strategy) -> bool:
    """A fused optimizer takes `found_inf` and skips its update on the device (as under
    GradScaler): `NonFiniteGuard.flag` then serves, with no sync. FSDP's sharded parameters keep
    the synchronous `check`."""
    fused = getattr(optimizer, "_step_supports_amp_scaling", False)
    return fused and not (strategy is not None and sharding.is_fsdp(strategy))
