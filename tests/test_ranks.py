"""Several real processes (gloo on the CPU): an error or a kill on one rank ends every rank
promptly with its message, and a stop signal sent to the whole process group saves one
checkpoint at an optimizer-step boundary and exits 0, under Lightning's launcher and torchrun."""

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
from tests.test_preemption import wait_for as wait_for_line

LONG = 100000  # steps: the run ends by the error or the signal, never by max_steps


def args(model: Path, shards: str, run: Path, extra: list[str]) -> list[str]:
    return tiny_overrides(model, shards, LONG) + [
        f"hydra.run.dir={run}",
        "logger=csv",
        "~callbacks.sample_images",
        f"callbacks.model_checkpoint.every_n_train_steps={LONG}",  # only a stop saves
        "trainer.strategy=ddp",
        *extra,
    ]


def start(cmd: list[str]) -> subprocess.Popen:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killpg reaches every rank, and only them
    )


def lightning(model: Path, shards: str, run: Path, extra: list[str] = ()) -> subprocess.Popen:
    """2 ranks from Lightning's own launcher (rank 0 starts rank 1)."""
    a = args(model, shards, run, ["trainer.devices=2", *extra])
    return start([sys.executable, "-m", "sdtrain.cli.train", *a])


def torchrun(model: Path, shards: str, run: Path, extra: list[str] = ()) -> subprocess.Popen:
    """2 ranks from torchrun (its agent starts both)."""
    a = args(model, shards, run, ["trainer.devices=2", *extra])
    run_py = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return start([*run_py, "-m", "sdtrain.cli.train", *a])


def wait_for(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """test_preemption's wait_for, killing every process of the run if `text` never comes."""
    try:
        return wait_for_line(proc, text, timeout)
    except AssertionError:
        kill_group(proc)
        raise


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The rest of the output once every process of the run has ended (the test fails, and
    kills them all, if they are still there after `timeout` seconds)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{out[-3000:]}") from None
    deadline = time.monotonic() + 15
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = group_alive(proc.pid)
    kill_group(proc)
    assert not left, f"processes of the run still alive after it ended: {left}"
    return out


def processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found.append((int(stat.parent.name), fields[0], int(fields[1]), int(fields[2])))
    return found


def group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes in the process group `pgid`."""
    return [pid for pid, state, _, group in processes() if group == pgid and state != "Z"]


def children(pid: int) -> list[int]:
    return [child for child, _, parent, _ in processes() if parent == pid]


STARTED = "training from step"  # rank 0's line once training has begun


@pytest.mark.parametrize("rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_an_error_on_one_rank_ends_every_rank_with_its_message(
    rank: int, tiny_model: Path, shards: str, tmp_path: Path
):
    extra = ["+callbacks.boom._target_=tests.ranks_helpers.RaiseAt", f"+callbacks.boom.rank={rank}"]
    proc = lightning(tiny_model, shards, tmp_path / "run", extra)
    out = "".join(wait_for(proc, f"boom on rank {rank}", 300))
    out += finish(proc, 60)  # before: the failing rank waited in a checkpoint barrier for good
    assert proc.returncode != 0
    assert "Traceback" in out and f"RuntimeError: boom on rank {rank} at step" in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_an_error_on_one_rank_under_torchrun_ends_every_rank(
    tiny_model: Path, shards: str, tmp_path: Path
):
    extra = ["+callbacks.boom._target_=tests.ranks_helpers.RaiseAt", "+callbacks.boom.rank=1"]
    proc = torchrun(tiny_model, shards, tmp_path / "run", extra)
    out = "".join(wait_for(proc, "boom on rank 1", 300))
    out += finish(proc, 90)  # torchrun's agent stops the other rank (its grace period: 30 s)
    assert proc.returncode != 0
    assert "RuntimeError: boom on rank 1 at step" in out


@pytest.mark.parametrize("victim", ["rank 1", pytest.param("rank 0", marks=pytest.mark.slow)])
def test_a_rank_killed_outright_ends_the_run(
    victim: str, tiny_model: Path, shards: str, tmp_path: Path
):
    proc = lightning(tiny_model, shards, tmp_path / "run")
    wait_for(proc, STARTED, 300)
    time.sleep(3)  # some steps in
    (child,) = children(proc.pid)  # rank 1, started by rank 0
    os.kill(child if victim == "rank 1" else proc.pid, signal.SIGKILL)
    end = time.monotonic() + 30  # Lightning's observer looks every 5 s; the watchdog every 1 s
    while group_alive(proc.pid) and time.monotonic() < end:
        time.sleep(0.5)
    left = group_alive(proc.pid)
    kill_group(proc)
    proc.communicate()
    assert not left, f"{victim} was killed, but {left} still run"


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param("lightning", marks=pytest.mark.slow(ci="first")),  # for time only
        pytest.param("torchrun", marks=pytest.mark.slow),
    ],
)
def test_a_stop_signal_to_the_whole_group_saves_once_at_a_step_boundary(
    launcher: str, tiny_model: Path, shards: str, tmp_path: Path
):
    run = tmp_path / "run"
    extra = ["trainer.accumulate_grad_batches=2"]
    proc = (lightning if launcher == "lightning" else torchrun)(tiny_model, shards, run, extra)
    wait_for(proc, STARTED, 300)
    time.sleep(4)  # some steps in
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM, Kubernetes and container runtimes signal
    out = finish(proc, 90)
    if launcher == "lightning":
        assert proc.returncode == 0, out[-3000:]
    assert "stopped by a signal at step" in out, out[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    step = ckpt["global_step"]
    assert step >= 1
    # the data position it holds is that of whole accumulation windows on both ranks
    loop = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert loop["completed"] == 2 * step, loop
