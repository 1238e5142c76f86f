"""A callback that acts every N optimizer steps and once at the end of training."""

from __future__ import annotations

import lightning as L


class EveryNSteps(L.Callback):
    """Calls `self.run(trainer, pl_module)` after every `every_n_steps` optimizer steps (0: never
    during training) and at the end of training, never twice at one step and never at the step a
    run starts or resumes at. `last_round`, the step of the last call, goes into checkpoints
    under the subclass's `state_key`, so a resumed run does not repeat a round.

    Lightning's `global_step` counts optimizer steps: while gradients accumulate it stays put,
    so a round runs once per optimizer step, not per micro-batch.
    """

    state_key_last = "last_round"  # the checkpoint's name for last_round (kept per subclass)
    every_n_steps: int = 0
    last_round: int | None = None

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> object:
        raise NotImplementedError

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_round is None:  # fresh run: the first round comes after optimizer steps
            self.last_round = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.last_round:
            self.last_round = step
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.last_round:
            self.last_round = trainer.global_step
            self.run(trainer, pl_module)

    def state_dict(self) -> dict:
        return {self.state_key_last: self.last_round}

    def load_state_dict(self, state: dict) -> None:
        self.last_round = state.get(self.state_key_last)
