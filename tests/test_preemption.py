"""Preemption with real signals: a real `sdtrain.cli.train` process gets SIGTERM or SIGUSR1 mid-run,
saves a checkpoint at the step reached, exits 0 within seconds, and a resume continues from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, tiny_overrides


def start(run: Path, model: Path, shards: str, extra: list[str]) -> subprocess.Popen:
    args = tiny_overrides(model, shards, steps=100000) + [
        f"hydra.run.dir={run}",
        "logger=csv",
        "~callbacks.sample_images",
        "callbacks.model_checkpoint.every_n_train_steps=100000",  # only the signal saves
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "sdtrain.cli.train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """Lines of the run's output up to the first holding `text`."""
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(lines)[-3000:]}")


# SIGUSR1 is slow here: tests/test_launchers.py sends it under SLURM (right after the default
# tests in CI)
# SIGINT: Ctrl-C stops as a preemption does (the resume line, exit 0); a second one stops at once
@pytest.mark.parametrize(
    "sig",
    [
        "SIGTERM",
        pytest.param("SIGINT", marks=pytest.mark.slow),
        pytest.param("SIGUSR1", marks=pytest.mark.slow),
    ],
)
def test_signal_saves_at_the_step_reached_and_resume_continues(
    sig: str, tiny_model: Path, shards: str, tmp_path: Path
):
    run = tmp_path / "run"
    proc = start(run, tiny_model, shards, [])
    wait_for(proc, "training from step", 300)  # the fit has started
    time.sleep(4)  # some steps in
    sent = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 0, out[-3000:]
    assert took < 30, f"{sig}: exit took {took:.1f} s"
    assert "stopped by a signal at step" in out
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    step = ckpt["global_step"]
    assert 1 <= step < 100000

    resumed = start(run, tiny_model, shards, ["ckpt_path=last", f"trainer.max_steps={step + 2}"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 2
