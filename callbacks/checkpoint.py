"""ModelCheckpoint that also saves the final step."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a save when training ends between two save steps.

    A run stopped by `max_steps` between `every_n_train_steps` boundaries would otherwise leave
    `last.ckpt` at the previous boundary and lose the steps since.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
