"""The console's progress bar, counted in optimizer steps: `step ━━━━━━ 120/1200 0:01:02 ...`.

Training runs for `trainer.max_steps` optimizer steps over an endless data stream, so Lightning's
own bar has nothing true to say about epochs: it labelled the demo's bar "Epoch 0/-2" (max_epochs
-1, minus one), counted micro-batches rather than steps under gradient accumulation, and showed the
logger's version (`v_num`). This bar counts the run's optimizer steps out of `max_steps` (a resumed
run starts at the step reached) beside the logged training metrics.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

LABEL = "step"


class _Steps:
    """What both bars share: the total, the count and the metrics shown."""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else float("inf")

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's run version: in the run folder line, not here
        return items

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # the bars draw `batch_idx + 1`: the optimizer steps done instead of this epoch's batches
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)


class RichStepBar(_Steps, RichProgressBar):
    """Lightning's rich bar (its default when `rich` is installed), in optimizer steps."""

    def _get_train_description(self, current_epoch: int) -> str:
        return LABEL

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)  # a resume's start


class TQDMStepBar(_Steps, TQDMProgressBar):
    """Lightning's tqdm bar (its default without `rich`), in optimizer steps."""

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(LABEL)
        self.train_progress_bar.n = trainer.global_step  # a resume's start


def with_step_bar(callbacks: list[Any], enabled: bool | None) -> list[Any]:
    """`callbacks`, plus the step bar where the trainer shows a bar (`trainer.enable_progress_bar`
    not false) and the list holds none of its own."""
    if enabled is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return callbacks
    return [*callbacks, RichStepBar() if _RICH_AVAILABLE else TQDMStepBar()]
