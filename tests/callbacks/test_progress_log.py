"""ProgressLog: step lines and a summary in train.log, host reads only on logging steps, and the
run-folder line naming only what the run wrote."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdtrain.callbacks.progress_log import ProgressLog, duration
from sdtrain.callbacks.report import smooth
from sdtrain.cli.train import train
from tests.callbacks.test_report import sigterm_overrides
from tests.conftest import compose_cfg, tiny_overrides
from tests.test_train import _cli

STEP_LINE = re.compile(
    r"step (\d+)/(\d+)  loss (\d+\.\d{4}) \(avg (\d+\.\d{4})\)  lr (\d\.\de[-+]\d\d)  ([\d.]+) img/s"
)


class CountingLog(ProgressLog):
    """Counts the host reads (each one copy of device values to the host: a sync on a GPU)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reads = 0

    def _values(self, *values):
        self.reads += any(isinstance(v, torch.Tensor) for v in values)
        return super()._values(*values)


def fake_trainer(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        is_global_zero=True,
        global_step=0,
        max_steps=6,
        log_every_n_steps=50,
        world_size=2,
        callback_metrics={},
        default_root_dir=str(tmp_path),
        checkpoint_callbacks=[],
        callbacks=[],
        loggers=[],
    )


def test_reads_the_host_only_on_logging_steps_and_averages_finite_losses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    losses = [1.0, 2.0, float("nan"), 3.0, 4.0, 5.0]
    cb = CountingLog(every_n_steps=2, smoothing=0.9)
    ticks = iter(range(100))
    cb.clock = lambda: float(next(ticks))  # one second per reading of the clock
    trainer = fake_trainer(tmp_path)
    batch = {"pixels": torch.zeros(4, 3, 8, 8)}
    caplog.set_level(logging.INFO, logger="sdtrain.callbacks.progress_log")
    cb.on_train_start(trainer, None)
    for step, loss in enumerate(losses, 1):
        trainer.global_step = step
        trainer.callback_metrics = {
            "train/loss": torch.tensor(loss),
            "train/lr": torch.tensor(1e-4 * step),
        }
        cb.on_train_batch_end(trainer, None, None, batch, step - 1)
        assert cb.reads == step // 2  # one read per logging step (2, 4, 6), none in between
    cb.on_fit_end(trainer, None)
    start, first, *lines = [r.getMessage() for r in caplog.records]
    assert start == f"training from step 0 to 6 in {tmp_path.resolve()}"
    assert re.fullmatch(r"first step done in [0-9.]+s", first)  # no compile: no warm-up note
    steps = [STEP_LINE.fullmatch(m) for m in lines[:3]]
    assert [int(m[1]) for m in steps] == [2, 4, 6] and all(m[2] == "6" for m in steps)
    assert [float(m[3]) for m in steps] == [2.0, 3.0, 5.0]  # the step's own loss
    finite = [v for v in losses if v == v]  # the NaN step is left out of the average
    for m, n in zip(steps, (2, 3, 5), strict=True):  # the average curves.png draws
        assert float(m[4]) == pytest.approx(smooth(finite[:n], 0.9)[-1], abs=1e-4)
    assert [m[5] for m in steps] == ["2.0e-04", "4.0e-04", "6.0e-04"]
    # 2 steps x 4 images x 2 ranks per window; the clock moves 1 s per reading
    assert [float(m[6]) for m in steps] == [16.0, 16.0, 16.0]
    assert lines[3] == (
        f"finished at step 6/6: 6 steps in 4.0s, 12.0 img/s; "
        f"loss 5.0000 (avg {smooth(finite, 0.9)[-1]:.4f})"
    )
    assert lines[4] == f"run folder: {tmp_path.resolve()}"  # nothing written
    assert cb.state_dict()["n"] == 5


def test_average_continues_across_a_resume(tmp_path: Path):
    first, second = ProgressLog(every_n_steps=100), ProgressLog(every_n_steps=100)
    trainer = fake_trainer(tmp_path)
    for cb, losses in ((first, [4.0, 2.0]), (second, [1.0])):
        cb.on_train_start(trainer, None)
        for loss in losses:
            trainer.global_step += 1
            trainer.callback_metrics = {"train/loss": torch.tensor(loss)}
            cb.on_train_batch_end(trainer, None, None, {"pixels": torch.zeros(1)}, 0)
        if cb is first:
            second.load_state_dict(first.state_dict())
    state = second.state_dict()
    assert state["n"] == 3
    assert second._average(state["ema"], state["n"]) == pytest.approx(smooth([4, 2, 1], 0.9)[-1])


def test_duration():
    assert [duration(s) for s in (3.21, 65, 3725)] == ["3.2s", "1m05s", "1h02m"]


def test_train_log_holds_step_lines_and_the_summary(tiny_model: Path, shards: str, tmp_path: Path):
    run = tmp_path / "run"
    args = tiny_overrides(tiny_model, shards, 6) + [
        "logger=csv",
        "trainer.log_every_n_steps=2",
        f"hydra.run.dir={run}",
    ]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (run / "train.log").read_text()  # Hydra's job log: the README's train.log
    steps = [STEP_LINE.search(line) for line in log.splitlines() if "loss" in line]
    assert [int(m[1]) for m in steps if m] == [2, 4, 6]
    assert all(float(m[6]) > 0 for m in steps if m)
    (done,) = [line for line in log.splitlines() if "finished at step" in line]
    assert re.search(r"finished at step 6/6: 6 steps in [\d.]+s, [\d.]+ img/s; loss \d", done)
    (folder,) = [line for line in log.splitlines() if "run folder:" in line]
    named = re.search(r"run folder: (\S+) \((.*)\)$", folder)
    assert Path(named[1]) == run.resolve()
    assert named[2].split(", ") == [
        "checkpoints/last.ckpt",
        "samples/step_0000006.png",
        "samples/index.html",
        "curves.png",
        "csv/version_0/",
        "train.log",
    ]


def test_end_line_names_only_what_exists(
    tiny_model: Path, shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="sdtrain.cli.train")
    keep = [o for o in tiny_overrides(tiny_model, shards, 2) if not o.startswith("callbacks.")]
    cfg = compose_cfg(tmp_path, keep + ["callbacks=none", "logger=csv"])
    assert train(cfg) is not None
    (line,) = [r.getMessage() for r in caplog.records if "run folder:" in r.getMessage()]
    assert line == f"run folder: {tmp_path.resolve()} (csv/version_0/)"
    assert not any((tmp_path / p).exists() for p in ("checkpoints", "samples", "wandb"))


def test_a_signal_stop_summarises_and_names_the_checkpoint_it_saves(
    tiny_model: Path, shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="sdtrain.callbacks.progress_log")
    overrides = sigterm_overrides(tiny_model, shards, 2, "none")
    assert train(compose_cfg(tmp_path, overrides)) is None
    lines = [r.getMessage() for r in caplog.records]
    (done,) = [m for m in lines if m.startswith("stopped (SIGTERMException) at step")]
    assert re.match(r"stopped \(SIGTERMException\) at step [23]/1000: [23] steps in ", done)
    (folder,) = [m for m in lines if m.startswith("run folder:")]
    assert "checkpoints/last.ckpt" in folder and "samples" not in folder  # saved right after
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_failure_before_the_first_step_says_so(tiny_model: Path, shards: str, tmp_path: Path):
    """An error while the trainer sets up (torch refuses lr=-1 when the optimizer is built, inside
    the fit): the summary says no step was trained, times the run from its start, and names no
    checkpoint. Before: `stopped (ValueError) at step 0/2: 0 steps in 7h36m` (the clock's
    origin: time since boot) naming a `checkpoints/last.ckpt` never written."""
    args = tiny_overrides(tiny_model, shards, 2) + ["model.optimizer.lr=-1"]  # W&B offline
    began = time.monotonic()
    proc = _cli(args, tmp_path, timeout=300)
    took = time.monotonic() - began
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ValueError: Invalid learning rate: -1" in out, out[-3000:]
    (done,) = [line for line in out.splitlines() if "before the first step" in line]
    said = re.search(
        r"failed \(ValueError\) before the first step, ([\dhms.]+) after the run started; nothing trained$",
        done,
    )
    assert said, done
    assert seconds(said[1]) <= took
    assert "steps in" not in out
    (folder,) = [line for line in out.splitlines() if "run folder:" in line]
    runs = tmp_path / "outputs" / "train" / "runs"
    (run,) = [p for p in runs.iterdir() if p.name != "latest"]
    assert folder.endswith(f"run folder: {run.resolve()} (wandb/{wandb_run(run)}/, train.log)")
    assert not (run / "checkpoints" / "last.ckpt").exists()
    assert (runs / "latest").resolve() == run.resolve()  # the run wrote: its folder stays


def seconds(text: str) -> float:
    """The seconds `duration` wrote: 12.3s, 4m05s, 2h03m."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?", text)
    h, mins, s = (float(g) if g else 0.0 for g in m.groups())
    return 3600 * h + 60 * mins + s


def wandb_run(run: Path) -> str:
    (folder,) = (run / "wandb").glob("offline-run-*")
    return folder.name
