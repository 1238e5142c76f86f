"""The validation-loss callback: `val/loss` and `val/loss_ema` at exact optimizer steps and at the
end of training (the loss itself and why it ranks runs: `sdtrain.training.validation`)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from sdtrain.callbacks.periodic import EveryNSteps
from sdtrain.callbacks.sampling import eager
from sdtrain.training import validation
from sdtrain.training.validation import VAL_LOSS, VAL_LOSS_EMA

log = logging.getLogger(__name__)


class ValidationLoss(EveryNSteps):
    """Logs `val/loss` (raw weights) and `val/loss_ema` (EMA weights) every N optimizer steps and
    at the end of training, with `val/loss_best` and `val/loss_ema_best` (the lowest so far).

    Runs on every rank (each scores its share of the held-out batches; the sums are reduced), on
    the datamodule's `heldout_dataloader()`; without held-out data it does nothing (said once).

    Args:
        every_n_steps: evaluate after every this many optimizer steps (0: only at the end).
        timesteps: K, the timesteps each held-out sample is scored at.
        seed: base of the per-sample posterior and noise draws.
    """

    def __init__(self, every_n_steps: int = 500, timesteps: int = 8, seed: int = 0) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"callbacks.val_loss.every_n_steps={every_n_steps!r} must be >= 0")
        self.every_n_steps, self.timesteps, self.seed = every_n_steps, timesteps, seed
        self.last_round: int | None = None  # step of the last evaluation (checkpointed)
        self.best: dict[str, float] = {}  # lowest value per key so far (checkpointed)
        self.history: list[tuple[int, dict[str, float]]] = []  # this process's evaluations
        self._batches: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        self._batches = dm.heldout_dataloader() if hasattr(dm, "heldout_dataloader") else None
        if self._batches is None and trainer.is_global_zero:  # the run's end says it, if it asks
            log.debug(
                "no held-out data (data.val_shards, data.val_split_shards): no %s", VAL_LOSS_EMA
            )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.best = dict(state.get("best") or {})

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate raw and EMA weights, log the values to every logger and to the trainer's
        callback_metrics (what `train()` returns from)."""
        step = trainer.global_step  # EveryNSteps has recorded it as last_round
        if self._batches is None:
            return {}
        reduce = None
        if trainer.world_size > 1:
            reduce = lambda x: trainer.strategy.reduce(x, reduce_op="sum")  # noqa: E731
        kw = dict(
            timesteps=self.timesteps,
            seed=self.seed,
            reduce=reduce,
            forward_context=trainer.precision_plugin.forward_context,
        )
        weights = {VAL_LOSS: validation.current_weights, VAL_LOSS_EMA: pl_module.ema_weights}
        # eager: a compiled U-Net would recompile for the last, smaller batch; held-out images
        # and captions need the VAE and text encoder on the device (`sdtrain.training.offload`)
        with eager(), pl_module.frozen_on_device():
            values = validation.evaluate_weights(pl_module, self._batches, weights, **kw)
        metrics = {k: v for k, v in values.items() if v is not None}
        for key, value in list(metrics.items()):
            self.best[key] = min(value, self.best.get(key, value))
            metrics[f"{key}_best"] = self.best[key]
        self.history.append((step, metrics))
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        if trainer.is_global_zero and metrics:
            shown = ", ".join(f"{k} {v:.5f}" for k, v in metrics.items() if "_best" not in k)
            log.info("validation at step %d: %s", step, shown)
        return metrics
