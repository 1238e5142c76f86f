"""ModelCheckpoint that also saves the final step, starts clean and rotates safely."""

from __future__ import annotations

import logging
import os

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sdtrain.artifacts.checkpoint_io import remove_partial
from sdtrain.training.nonfinite import NonFiniteStepError
from sdtrain.training.skips import BadDataError

log = logging.getLogger(__name__)

# Raised on every rank at the same step: a checkpoint save (a collective) is safe then.
GROUP_WIDE = (SIGTERMException, NonFiniteStepError, BadDataError)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two spellings name one file (symlinked folders, `..`, hard links), not equal strings."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is gone, or not a local path
        return os.path.abspath(a) == os.path.abspath(b)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a save when training ends between two save steps, and
    rotation that never removes the checkpoint the run resumed from or the newest one.

    A run stopped by `max_steps` between `every_n_train_steps` boundaries would otherwise leave
    `last.ckpt` at the previous boundary and lose the steps since.

    Files are written atomically by `sdtrain.artifacts.checkpoint_io.AtomicCheckpointIO` (a trainer plugin);
    a run killed mid-save leaves `.<name>.tmp-<pid>` files, removed here when the next run starts.

    Rotation (`save_top_k`) removes a file only after its successor is completely written, and
    Lightning already spares the resume file, but by comparing path strings: resumed through a
    symlinked folder (`/scratch` -> `/lustre`) it deleted the very file it resumed from. Here files
    are compared by identity. A file spared this way leaves the top-k bookkeeping and stays on disk.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not trainer.is_global_zero or stage != "fit":
            return
        if self.dirpath:
            remove_partial(self.dirpath)
        io = trainer.strategy.checkpoint_io
        if type(io) is TorchCheckpointIO:  # the plugin list was replaced without ours
            log.warning(
                "checkpoints are written in place: a kill mid-save can leave a truncated file. "
                "Keep sdtrain.artifacts.checkpoint_io.AtomicCheckpointIO in trainer.plugins."
            )

    def saves_on_exception(self, trainer, exception: BaseException) -> bool:
        """Whether `on_exception` will write last.ckpt for `exception` (the run summary, which
        runs before it, names the file only then): `save_on_exception` and `save_last` are on,
        a step was trained since the last save (none at step 0: nothing to save), and the ranks
        raise it together or there is one process."""
        if trainer.world_size > 1 and not isinstance(exception, GROUP_WIDE):
            return False
        return bool(self.save_last) and self._should_save_on_exception(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Save on an exception only where every rank raises it together (a stop request, the
        non-finite stop, the bad-data stop) or on a single process. An error on one rank of
        several must not wait in the save's barrier while the others sit in the step's
        all-reduce: it ends the run with its own message instead (Lightning's observer and
        `sdtrain.runtime.watchdog` end the other ranks)."""
        if trainer.world_size > 1 and not isinstance(exception, GROUP_WIDE):
            log.error(
                "rank %d: %s: %s; no checkpoint is saved for an error on one rank (the run "
                "resumes from the last saved step)",
                trainer.global_rank,
                type(exception).__name__,
                exception,
            )
            return
        super().on_exception(trainer, pl_module, exception)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        # Lightning removes `previous` right after `current` was saved: `current` is the newest
        # complete checkpoint, and `trainer.ckpt_path` the one this run resumed from.
        keep = [p for p in (current, self._last_checkpoint_saved, trainer.ckpt_path) if p]
        if any(same_file(previous, p) for p in keep):
            return False
        return super()._should_remove_checkpoint(trainer, previous, current)
