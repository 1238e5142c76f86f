"""The optimizer step's hooks of the training module (a mixin of `StableDiffusionModule`): the
optimizer and LR schedule, the non-finite gradient check, clipping, schedule-free's train/eval
switch, and the EMA update after each optimizer step (with the scope that swaps the EMA in)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

from sdtrain.artifacts import checkpoint
from sdtrain.datamodules import batch as B
from sdtrain.models import lora
from sdtrain.training import optimizers, sharding
from sdtrain.training.lr_schedule import hold_after_horizon
from sdtrain.training.nonfinite import clip_with_norm, skips_on_device


class OptimizerHooks:
    """Needs from the module: `hparams.text_encoder_lr`, `optimizer_factory`,
    `lr_scheduler_factory`, `ema`, `nonfinite`, `trainable_parameters()`, the step's flags set in
    its `__init__` (`_skip_update`, `_found_inf`, `_grad_norm`, `_lr_horizon`, `_graph_steps`) and
    Lightning's hooks."""

    def configure_optimizers(self):
        lr = self.hparams.text_encoder_lr  # a group of its own when the text encoder trains
        groups = lora.param_groups(self.trainable_parameters(), lr)
        opt = optimizers.build(self.optimizer_factory, groups)  # any model.optimizer._target_
        if self.lr_scheduler_factory is None:
            return opt
        sched = self.lr_scheduler_factory(optimizer=opt)
        self._lr_horizon = hold_after_horizon(sched, self.lr_scheduler_factory)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resume restored the scheduler's state, and with it the horizon recorded then: record
        this run's instead (they differ only when the resume set model.lr_scheduler.num_training_steps
        explicitly; sdtrain.cli.train.keep_lr_horizon), so its checkpoints say what it ran."""
        if self._trainer is None or self._lr_horizon is None:
            return
        for config in self._trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, checkpoint.LR_HORIZON):
                setattr(config.scheduler, checkpoint.LR_HORIZON, self._lr_horizon)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Under bf16 autocast there is no loss scaler, so nothing to unscale: clip the norm
        directly. Lightning's AMP plugin refuses any clipping with a fused optimizer (it assumes
        a float16 scaler), which would rule out fused AdamW, the faster update on GPUs. The
        non-finite check's norm is reused: the gradients are read once for it, not twice."""
        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        direct = isinstance(plugin, MixedPrecision) and plugin.scaler is None
        norm, self._grad_norm = self._grad_norm, None
        plain = norm is not None and type(plugin) in (Precision, HalfPrecision)  # no scaler
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and (direct or plain):
            params = [p for _, p in self.trainable_parameters() if p.grad is not None]
            clip_with_norm(params, gradient_clip_val, norm)  # as clip_grad_norm_ does
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        """After backward (and DDP's all-reduce), before clipping: drop non-finite gradients."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        reduce = None
        if strategy is not None and strategy.world_size > 1:
            reduce = partial(strategy.reduce, reduce_op="sum")
        params = (p for _, p in self.trainable_parameters())
        opt = getattr(optimizer, "optimizer", optimizer)  # under Lightning's wrapper
        self._found_inf = None
        if skips_on_device(opt, strategy):  # no sync: the optimizer skips on the GPU
            self._found_inf = self.nonfinite.flag(params, self.global_step + 1, reduce)
            opt.found_inf = self._found_inf
        else:
            self._skip_update = self.nonfinite.check(params, self.global_step + 1, reduce)
        fsdp = strategy is not None and sharding.is_fsdp(strategy)
        self._grad_norm = None if fsdp else self.nonfinite.norm  # a shard's norm is not the norm
        if self._trainer is not None:
            skipped = self.nonfinite.pending_total(self.device)  # a float would sync
            self.log("train/skipped_nonfinite", skipped, reduce_fx="max")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A schedule-free optimizer takes gradients at its training point (`sdtrain.training.optimizers`);
        with CUDA graphs, a new step of the graph trees (`sdtrain.models.cuda_graphs`)."""
        optimizers.train_mode(self._trainer.optimizers)
        if self._graph_steps is not None:
            image = batch.get(B.image_key(batch)) if isinstance(batch, dict) else None
            self._graph_steps.begin(None if image is None else tuple(image.shape))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update: once per optimizer step (not per micro-batch),
        before any callback's on_train_batch_end, so checkpoints and samples see this step's EMA.
        A step whose gradients were dropped as non-finite leaves the EMA alone too."""
        self._skip_update, self._found_inf = False, None
        super().optimizer_step(*args, **kwargs)
        trainer_optimizers = self._trainer.optimizers if self._trainer is not None else []
        optimizers.eval_mode(trainer_optimizers)  # schedule-free: x for all until the next step
        step = self.global_step + 1  # Lightning counts this step once the hook returns
        if self._skip_update:
            return
        found_inf = self._found_inf
        if self.ema is not None and step % self.ema.update_every == 0:
            keep = None if found_inf is None else 1.0 - found_inf
            self.ema.update(self.trainable_parameters(), step, keep)
        every = self._trainer.log_every_n_steps if self._trainer is not None else 1
        if found_inf is not None and step % max(1, every) == 0:
            self.nonfinite.settle(step)  # a sync once a logging window, as logging makes anyway

    @contextmanager
    def ema_weights(self) -> Iterator[bool]:
        """Within the scope the trainable weights are the EMA's; after it, exactly the raw ones.

        Yields whether EMA weights are in (False without an EMA, or before it has a shadow).
        """
        if self.ema is None or self.ema.shadow is None:
            yield False
            return
        with self.ema.swapped_in(self.trainable_parameters()):
            yield True
