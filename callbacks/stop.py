"""Stop every rank together, at an optimizer-step boundary, when any rank was asked to stop.

`sdtrain.runtime.preemption.StopRequests` notes SIGTERM, SIGUSR1 and a first Ctrl-C without
doing anything in the signal handler. After each optimizer step this callback combines every
rank's note (a max all-reduce) and, when one is set, has Lightning stop after that batch on every
rank (its SIGTERM path: `SIGTERMException`, which the checkpoint callback saves on and
`sdtrain-train` reports with the resume command). All ranks stop at the same step, at a window
boundary under gradient accumulation (a resumed run then starts a fresh window), and no rank
waits in a collective for one that has already left.

On a GPU the all-reduce is read one step later, from pinned memory, so the step never waits for
it: a request stops the run one optimizer step after it arrives.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sdtrain.runtime.preemption import StopRequests, lightning_requeues


class GroupStop(L.Callback):
    def __init__(self) -> None:
        self.requests = StopRequests()
        self._step: int | None = None
        self._pending: tuple[Any, torch.Tensor] | None = None  # (CUDA event, pinned host value)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its own SIGTERM handler just before (it forwards the signal to
        # child ranks and runs a collective inside the handler): this one replaces it for the
        # training loop; Lightning restores the handlers from before `fit` when it ends.
        self.requests.install(usr1=not lightning_requeues(trainer))
        self._step, self._pending = trainer.global_step, None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requests.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self.requests.restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:  # inside an accumulation window
            return
        self._step = trainer.global_step
        if self.any_rank_asked(trainer):
            stop_after_this_batch(trainer)

    def any_rank_asked(self, trainer: L.Trainer) -> bool:
        """Whether any rank noted a stop request (the same answer on every rank)."""
        mine = self.requests.requested
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return mine
        device = trainer.strategy.root_device
        flag = torch.full((), float(mine), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if device.type != "cuda":
            return bool(flag.item())
        decided = False
        if self._pending is not None:  # last step's answer, long since copied to the host
            event, host = self._pending
            event.synchronize()
            decided = bool(host.item())
        host = torch.empty((), pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (event, host)
        return decided


def stop_after_this_batch(trainer: L.Trainer) -> None:
    """Lightning's SIGTERM path: it raises SIGTERMException once this batch has completed."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not hasattr(connector, "received_sigterm"):  # a Lightning without it
        raise SIGTERMException
    connector.received_sigterm = True
