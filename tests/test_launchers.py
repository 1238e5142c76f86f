"""The launchers for real on the CPU: scripts/torchrun.sh with 2 processes, and scripts/slurm.sh
under a stand-in SLURM (fake `srun`, `scontrol` and SLURM_* variables): a deterministic run folder
per job, resume from `last` on the next start, and preemption by SIGUSR1 through Lightning's
auto-requeue (save, `scontrol requeue`, then the requeue's SIGTERM stops the run)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.test_preemption import wait_for

SHIMS = {
    # one node, one task: run it here (srun's own options, such as --kill-on-bad-exit, dropped)
    "srun": '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
    # records its arguments, then ends the job as SLURM's requeue does: SIGTERM to the caller
    "scontrol": '#!/usr/bin/env bash\necho "$@" >> "$SCONTROL_LOG"\nkill -TERM "$PPID"\n',
}


def cpu_args(model: Path, shards: str, steps: int) -> list[str]:
    """The launchers' GPU defaults made tiny: CPU, fp32, 32 px, no sampling."""
    return [
        f"model.pretrained={model}",
        "data=webdataset",  # your own shards (the demo group refuses them)
        f"data.train_shards='{shards}'",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        f"trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
        "data.resolution=32",
        "data.num_workers=0",
        "data.batch_size=4",
        "logger=csv",
        "~callbacks.sample_images",
    ]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, body in SHIMS.items():
        (shims / name).write_text(body)
        (shims / name).chmod(0o755)
    path = os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ["PATH"]])
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        keep.pop(var, None)
    return dict(keep, PATH=path, PWD=str(tmp_path), OMP_NUM_THREADS="1")


def slurm_env(env: dict[str, str], job_id: str, log: Path) -> dict[str, str]:
    """What SLURM sets for the one task of a 1-node, 1-task job (Lightning's SLURMEnvironment)."""
    with socket.socket() as s:  # DDP's rendezvous port (SLURM jobs derive one from the job id)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = {v: "0" for v in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")}
    counts = {v: "1" for v in ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES")}
    return dict(
        env, **one, **counts, SLURM_JOB_ID=job_id, SLURM_JOB_NAME="sdtrain",
        SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        SCONTROL_LOG=str(log),
    )  # fmt: skip


def slurm(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    script = ROOT / "scripts" / "slurm.sh"
    return subprocess.Popen(
        ["bash", str(script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_torchrun_two_cpu_processes_over_gloo(
    tiny_model: Path, shards: str, tmp_path: Path, env: dict[str, str]
):
    """2 processes from torchrun on the CPU: gloo, one run folder, and the global batch split
    over torchrun's WORLD_SIZE (8 = 2 x 4)."""
    run = tmp_path / "run"
    args = cpu_args(tiny_model, shards, 2) + ["data.global_batch_size=8", f"hydra.run.dir={run}"]
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "torchrun.sh"), "2", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "distributed_backend=gloo" in out and "Starting with 2 processes" in out, out[-4000:]
    assert "global batch 8 = 2 process(es) x 4 per device x 1 accumulation" in out
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and last["sdtrain"]["drawn_total"] == 2 * 8


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_slurm_job_resumes_in_its_own_folder(
    tiny_model: Path, shards: str, tmp_path: Path, env: dict[str, str]
):
    """slurm.sh's run folder is outputs/slurm/<job id>; a second start of the job (a requeue)
    resumes from its last.ckpt; another job starts afresh in its own folder."""
    job = slurm_env(env, "4242", tmp_path / "scontrol.log")
    first = slurm(cpu_args(tiny_model, shards, 2), job, tmp_path)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-4000:]
    run = tmp_path / "outputs" / "slurm" / "4242"
    assert step_of(run / "checkpoints" / "last.ckpt") == 2

    again = slurm(cpu_args(tiny_model, shards, 4), job, tmp_path)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-4000:]
    assert "slurm.sh: resuming" in out
    assert step_of(run / "checkpoints" / "last.ckpt") == 4
    assert (run / ".hydra" / "resume-1" / "overrides.yaml").is_file()  # the first record kept
    assert not (tmp_path / "scontrol.log").exists()  # no signal, no requeue


@pytest.mark.slow  # ~26 s; CI runs it
def test_sigusr1_under_slurm_saves_requeues_and_the_requeued_job_resumes(
    tiny_model: Path, shards: str, tmp_path: Path, env: dict[str, str]
):
    """SIGUSR1 (SLURM's warning) with Lightning's auto-requeue: hpc_ckpt_1.ckpt is saved in the
    run folder and `scontrol requeue <job id>` runs; its SIGTERM stops the run with last.ckpt at
    the step reached (exit 0), and the requeued job (same id) resumes from there."""
    log = tmp_path / "scontrol.log"
    job = slurm_env(env, "4343", log)
    args = cpu_args(tiny_model, shards, 100000) + [
        "callbacks.model_checkpoint.every_n_train_steps=100000"  # only the signals save
    ]
    proc = slurm(args, job, tmp_path)  # slurm.sh execs srun, which execs the task: its pid
    wait_for(proc, "training from step", 300)  # the fit has started
    time.sleep(4)  # some steps in
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert log.read_text().split() == ["requeue", "4343"]
    run = tmp_path / "outputs" / "slurm" / "4343"
    hpc, last = run / "hpc_ckpt_1.ckpt", run / "checkpoints" / "last.ckpt"
    assert 1 <= step_of(hpc) <= step_of(last)
    step = step_of(last)

    requeued = slurm(cpu_args(tiny_model, shards, step + 2), job, tmp_path)
    out, _ = requeued.communicate(timeout=600)
    assert requeued.returncode == 0, out[-4000:]
    assert step_of(last) == step + 2


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded-folder"])
def test_slurm_resumes_from_a_last_checkpoint_file_or_sharded_folder(
    sharded: bool, tmp_path: Path, env: dict[str, str]
):
    """The start-up rule alone (srun records its command): checkpoints/last.ckpt as one file,
    or as trainer=fsdp's sharded folder (meta.pt inside), makes the job resume from `last`."""
    (tmp_path / "shims" / "srun").write_text('#!/usr/bin/env bash\necho "$@" > "$SRUN_LOG"\n')
    last = tmp_path / "outputs" / "slurm" / "77" / "checkpoints" / "last.ckpt"
    if sharded:
        last.mkdir(parents=True)
        (last / "meta.pt").write_bytes(b"")
    else:
        last.parent.mkdir(parents=True)
        last.write_bytes(b"")
    log = tmp_path / "srun.log"
    proc = slurm(
        [], dict(slurm_env(env, "77", tmp_path / "scontrol.log"), SRUN_LOG=str(log)), tmp_path
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "resuming" in out and log.read_text().split()[-1] == "ckpt_path=last", log.read_text()
    assert log.read_text().split()[0] == "--kill-on-bad-exit=1"  # a failed task ends the others
