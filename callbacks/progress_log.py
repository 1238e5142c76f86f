"""The run reports itself in its log (`train.log` in the run folder, and the console).

Every `every_n_steps` optimizer steps (default: `trainer.log_every_n_steps`), one line:

    step 120/400  loss 0.1234 (avg 0.1301)  lr 1.0e-04  12.3 img/s

`avg` is the debiased exponential moving average of the loss (`smoothing`, as curves.png draws
it), `img/s` the images of all ranks trained since the previous line over its wall time (sampling
rounds and checkpoint saves included). When training starts, one line naming the step range and
the run folder. At the end, and when a run stops by an exception (a preemption signal, a crash,
Ctrl-C), a summary: steps done, wall time since training started, final and smoothed loss, mean
img/s, and the files the run wrote (a checkpoint only if it is on disk, or being saved for this
stop). A run that ends before its first step says so, with the time since the run started.

Values are read from `trainer.callback_metrics`, so it works with any logger or none. The
moving average is kept on the device: the host reads values (one sync) only on logging steps.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sdtrain.callbacks.checkpoint import StepCheckpoint
from sdtrain.callbacks.report import TrainingReport, sampling_callbacks
from sdtrain.datamodules import batch as B
from sdtrain.runtime import run_folder

log = logging.getLogger(__name__)

STOPS = (SIGTERMException, KeyboardInterrupt)  # a stop request (signal, Ctrl-C), not a failure


class ProgressLog(L.Callback):
    """Logs loss, LR and img/s every `every_n_steps` optimizer steps, and a summary at the end.

    Rank 0 only; no collective (a report must not risk a hang).

    Args:
        every_n_steps: a line every this many optimizer steps (None: trainer.log_every_n_steps).
        smoothing: weight of the past in the loss average (0.9 ≈ a 10-step mean).
        loss: the logged metric shown as the loss.
        lr: the logged metric shown as the learning rate.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        smoothing: float = 0.9,
        loss: str = "train/loss",
        lr: str = "train/lr",
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"callbacks.progress_log.every_n_steps={every_n_steps}: must be >= 1")
        if not 0 <= smoothing < 1:
            raise ValueError(f"callbacks.progress_log.smoothing={smoothing} is not in [0, 1)")
        self.every_n_steps = every_n_steps
        self.smoothing = smoothing
        self.loss_key, self.lr_key = loss, lr
        self.clock = time.perf_counter  # host seconds; tests swap in their own
        # Debiased EMA of the finite losses: avg = _ema / (1 - smoothing ** _n); device tensors.
        self._ema: torch.Tensor | float = 0.0
        self._n: torch.Tensor | int = 0
        self._last_step: int | None = None
        self._start_step: int | None = None  # the step training started from; None: not yet
        self._fit_start: float | None = None  # when the fit started (setup), host seconds
        self._start = self._window_start = 0.0  # when training started
        self._images = self._window_images = 0  # this rank's, since the start / the last line

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._fit_start, self._start_step = self.clock(), None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._window_start = self.clock()
        self._started = time.monotonic()
        self._start_step = self._last_step = trainer.global_step
        self._images = self._window_images = 0
        if trainer.is_global_zero:
            to = f" to {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
            root = Path(trainer.default_root_dir).resolve()
            log.info("training from step %d%s in %s", trainer.global_step, to, root)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        images = B.batch_size(batch)  # every micro-batch counts
        self._images += images
        self._window_images += images
        step = trainer.global_step  # optimizer steps; unchanged while gradients accumulate
        if step == self._last_step:
            return
        if self._last_step == self._start_step:  # the run's first step: its warm-up included
            compiled = getattr(getattr(pl_module, "hparams", None), "compile", None)
            why = f" (compile warm-up, model.compile={compiled})" if compiled else ""
            took = time.monotonic() - self._started  # not self.clock(): the windows' own reads
            log.info("first step done in %s%s", duration(took), why)
        self._last_step = step
        loss = trainer.callback_metrics.get(self.loss_key)
        if loss is not None:
            self._update_average(loss)
        if step % self.interval(trainer) == 0:
            self.log_step(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:  # after every callback's on_train_end
        self.summary(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.summary(trainer, exception)

    def state_dict(self) -> dict:
        avg = self._values(self._ema, self._n)
        return {"ema": avg[0], "n": int(avg[1])}

    def load_state_dict(self, state: dict) -> None:
        self._ema, self._n = float(state.get("ema", 0.0)), int(state.get("n", 0))

    # ------------------------------------------------------------------ work

    def interval(self, trainer: L.Trainer) -> int:
        return max(1, self.every_n_steps or trainer.log_every_n_steps or 1)

    def _update_average(self, loss: torch.Tensor | float) -> None:
        """One EMA step on the device, skipping a non-finite loss (no host sync)."""
        loss = torch.as_tensor(loss).detach().float().reshape(())
        finite = torch.isfinite(loss)
        ema = torch.as_tensor(self._ema, device=loss.device)
        moved = self.smoothing * ema + (1 - self.smoothing) * torch.where(finite, loss, 0.0)
        self._ema = torch.where(finite, moved, ema)
        self._n = torch.as_tensor(self._n, device=loss.device) + finite.long()

    def _average(self, ema: float, n: float) -> float:
        if not n:
            return math.nan
        return ema / (1 - self.smoothing**n) if self.smoothing else ema

    @staticmethod
    def _values(*values) -> list[float]:
        """Host floats of `values` (tensors and numbers): one copy for all the tensors."""
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not tensors:
            return [float(v) for v in values]
        device = tensors[0].device
        read = iter(torch.stack([v.float().reshape(()).to(device) for v in tensors]).tolist())
        return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]

    def log_step(self, trainer: L.Trainer) -> None:
        metrics = trainer.callback_metrics
        named = {"loss": metrics.get(self.loss_key), "lr": metrics.get(self.lr_key)}
        named = {k: v for k, v in named.items() if v is not None} | {"ema": self._ema, "n": self._n}
        v = dict(zip(named, self._values(*named.values()), strict=True))
        now = self.clock()  # after the sync above: the window's queued device work is done
        parts = [f"step {self._of(trainer)}"]
        if "loss" in v:
            parts.append(f"loss {v['loss']:.4f} (avg {self._average(v['ema'], v['n']):.4f})")
        if "lr" in v:
            parts.append(f"lr {v['lr']:.1e}")
        seconds = now - self._window_start
        if seconds > 0:
            parts.append(f"{self._window_images * trainer.world_size / seconds:.1f} img/s")
        log.info("  ".join(parts))
        self._window_start, self._window_images = now, 0

    def _of(self, trainer: L.Trainer) -> str:
        max_steps = trainer.max_steps
        return (
            f"{trainer.global_step}/{max_steps}"
            if max_steps and max_steps > 0
            else str(trainer.global_step)
        )

    def summary(self, trainer: L.Trainer, exception: BaseException | None = None) -> None:
        """The end-of-run lines (rank 0). Never raises: a report must not turn a finished run,
        or a stopped one saving its checkpoint, into a crash."""
        if not trainer.is_global_zero:
            return
        try:
            if self._start_step is None or trainer.global_step == self._start_step:
                log.info(self._no_step_line(trainer, exception))
            else:
                log.info(self._steps_line(trainer, exception))
            log.info(run_folder_line(trainer, exception))
            for lg in trainer.loggers:
                folder = wandb_folder(lg)
                if folder is not None and getattr(lg.experiment, "offline", False):
                    log.info("W&B run saved offline; upload it with: wandb sync %s", folder)
        except Exception:
            log.exception("the run summary failed")

    def _steps_line(self, trainer: L.Trainer, exception: BaseException | None) -> str:
        """`finished at step 6/6: 6 steps in 4.0s, 12.0 img/s; loss 0.1234 (avg 0.1301)`."""
        seconds = self.clock() - self._start
        loss = trainer.callback_metrics.get(self.loss_key)
        ema, n, *last = self._values(self._ema, self._n, *([loss] if loss is not None else []))
        steps = trainer.global_step - self._start_step
        how = "finished" if exception is None else f"stopped ({type(exception).__name__})"
        line = f"{how} at step {self._of(trainer)}: {steps} steps in {duration(seconds)}"
        if seconds > 0 and self._images:
            line += f", {self._images * trainer.world_size / seconds:.1f} img/s"
        if last:
            line += f"; loss {last[0]:.4f} (avg {self._average(ema, n):.4f})"
        return line

    def _no_step_line(self, trainer: L.Trainer, exception: BaseException | None) -> str:
        """`failed (ValueError) before the first step, 9.1s after the run started; nothing trained`."""
        if exception is None:
            how = "finished"
        elif isinstance(exception, STOPS):
            how = f"stopped ({type(exception).__name__})"
        else:
            how = f"failed ({type(exception).__name__})"
        line = f"{how} before the first step"
        if trainer.global_step:  # a resumed run
            line += f" (at step {self._of(trainer)})"
        seconds = run_folder.seconds_since_start()  # since Hydra started the run
        if seconds is None and self._fit_start is not None:  # train(cfg) called in-process
            seconds = self.clock() - self._fit_start
        if seconds is not None:
            line += f", {duration(seconds)} after the run started"
        return line + "; nothing trained"


# ---------------------------------------------------------------- what a run wrote


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def wandb_folder(logger) -> Path | None:
    """The folder of the W&B run `logger` started (None if it started none, or wrote nowhere)."""
    if not isinstance(logger, WandbLogger) or logger._experiment is None:
        return None
    try:
        folder = Path(logger.experiment.dir).parent  # <save_dir>/wandb/<run>/files
    except Exception:  # a disabled run has no folder
        return None
    return folder if folder.is_dir() and folder.parent.name == "wandb" else None


def outputs(trainer: L.Trainer, exception: BaseException | None = None) -> list[Path]:
    """The files and folders this run wrote, among those a user looks for, in that order.

    Args:
        exception: the run stops by this exception; a checkpoint callback that will save for it
            (`StepCheckpoint.saves_on_exception`, run after this report) counts its last.ckpt
            before it is on disk. Otherwise a checkpoint counts only if it is on disk.
    """
    found: list[Path] = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            last = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
            pending = (
                exception is not None
                and isinstance(cb, StepCheckpoint)
                and cb.saves_on_exception(trainer, exception)
            )
            if last.is_file() or pending:
                found.append(last)
    for cb in sampling_callbacks(trainer):
        folder = cb.folder(trainer)
        grids = sorted(folder.glob("step_*.png")) if folder.is_dir() else []
        if grids:
            found.append(grids[-1])
            if (folder / "index.html").is_file():
                found.append(folder / "index.html")
    for cb in trainer.callbacks:
        if isinstance(cb, TrainingReport) and cb.plot_file(trainer).is_file():
            found.append(cb.plot_file(trainer))
    for lg in trainer.loggers:
        if isinstance(lg, CSVLogger) and Path(lg.log_dir).is_dir():
            found.append(Path(lg.log_dir))
        elif (folder := wandb_folder(lg)) is not None:
            found.append(folder)
    for handler in logging.getLogger().handlers:  # Hydra's job log: train.log
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_file():
            found.append(Path(handler.baseFilename))
    return list(dict.fromkeys(found))


def run_folder_line(trainer: L.Trainer, exception: BaseException | None = None) -> str:
    """`run folder: <dir> (checkpoints/last.ckpt, samples/step_0000400.png, ...)`: only what
    exists (or is being saved for `exception`), inside the folder relative to it."""
    root = Path(trainer.default_root_dir).resolve()
    names = []
    for path in outputs(trainer, exception):
        try:
            name = path.resolve().relative_to(root).as_posix()
        except ValueError:  # written outside the run folder
            name = str(path)
        names.append(name + "/" if path.is_dir() else name)
    return f"run folder: {root}" + (f" ({', '.join(names)})" if names else "")
