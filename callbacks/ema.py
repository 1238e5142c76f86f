"""Exponential moving average of the U-Net's weights, kept in fp32 and saved with checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn


def ema_decay(step: int, max_decay: float, warmup: bool) -> float:
    """Decay for the `step`-th update (0-based).

    With warm-up the decay starts small and rises as (1 + n) / (10 + n), so early averages are not
    dominated by the random initial weights; it is capped at `max_decay` (0.9999 ~ a 10k-step
    window).
    """
    if not warmup:
        return max_decay
    return min(max_decay, (1 + step) / (10 + step))


class EMA(L.Callback):
    """Keeps an fp32 shadow of `pl_module.unet` updated after every optimizer step.

    Args:
        decay: the decay cap.
        warmup: ramp the decay up from 0.1 (see `ema_decay`).
        update_every: update every this many optimizer steps (decay applied once per update).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay} is not in (0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.shadow: dict[str, torch.Tensor] | None = None
        self.num_updates = 0
        self.last_step: int | None = None  # the optimizer step of the last update (or fit start)

    @staticmethod
    def _params(module: nn.Module) -> dict[str, nn.Parameter]:
        return dict(module.unet.named_parameters())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self._params(pl_module)
        if self.shadow is None:
            self.shadow = {k: p.detach().float().clone() for k, p in params.items()}
        else:  # restored from a checkpoint: check it matches, and move it to the device
            if self.shadow.keys() != params.keys():
                raise KeyError("EMA state in the checkpoint does not match the U-Net's parameters")
            self.shadow = {k: v.to(params[k].device) for k, v in self.shadow.items()}
        if self.last_step is None:  # a fresh run: nothing to average before the first step
            self.last_step = trainer.global_step if trainer is not None else 0

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps: it stays put while gradients accumulate, so the
        # EMA moves once per optimizer step, never before the first one.
        step = trainer.global_step
        if step == self.last_step or step % self.update_every:
            return
        self.last_step = step
        self.update(pl_module.unet)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * params."""
        d = ema_decay(self.num_updates, self.decay, self.warmup)
        names = list(self.shadow)
        params = dict(module.named_parameters())
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1.0 - d
        )
        self.num_updates += 1

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into `module` (for sampling), then put the raw back."""
        params = dict(module.named_parameters())
        backup = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(backup[k])

    def state_dict(self) -> dict[str, Any]:
        shadow = None if self.shadow is None else {k: v.cpu() for k, v in self.shadow.items()}
        return {
            "shadow": shadow,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = state["shadow"]
        self.num_updates = state["num_updates"]
        self.last_step = state.get("last_step")


def find_ema(trainer: L.Trainer) -> EMA | None:
    return next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
