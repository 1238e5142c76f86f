"""Checkpoint files: the final step is saved, a save is atomic (a real run SIGKILLed mid-save
leaves only loadable checkpoints and resumes from `last`), and rotation spares the resume file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdtrain.artifacts.checkpoint_io import (
    AtomicCheckpointIO,
    atomic_write,
    partial_name,
    put_back,
    remove_partial,
    replace_folder,
)
from sdtrain.cli.train import train
from tests.conftest import ROOT, compose_cfg, tiny_overrides


def quiet(model: Path, shards: str, steps: int, every: int) -> list[str]:
    return tiny_overrides(model, shards, steps) + [
        "logger=none",
        "~callbacks.sample_images",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
    ]


def test_last_checkpoint_is_the_final_step(tiny_model: Path, shards: str, tmp_path: Path):
    # 5 steps, saving every 2: Lightning's ModelCheckpoint alone leaves last.ckpt at step 4
    train(compose_cfg(tmp_path, quiet(tiny_model, shards, 5, every=2)))
    folder = tmp_path / "checkpoints"
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt",
        "step_0000004.ckpt",
        "step_0000005.ckpt",
    ]


class Boom:
    """Pickling it raises: torch.save fails after writing the tensors before it."""

    def __reduce__(self):
        raise RuntimeError("disk full")


def test_a_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"w": torch.zeros(1 << 20), "later": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp left behind
    assert not synced

    def half_then_die(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_die)
    assert torch.load(path, weights_only=True) == {"step": 1}

    io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert len(synced) == 2  # the file's bytes, then the folder's rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_sharded_folders_replace_whole_and_a_killed_swap_is_undone(tmp_path: Path):
    """Sharded checkpoints are folders: the new one is renamed onto the name once complete; a
    kill between setting the old one aside and renaming the new one leaves no `last.ckpt`, and
    the next run's start puts the old one back (with no other leftovers)."""
    last = tmp_path / "last.ckpt"
    last.mkdir()
    (last / "meta.pt").write_bytes(b"old")
    new = partial_name(last)
    new.mkdir()
    (new / "meta.pt").write_bytes(b"new")
    replace_folder(new, last)
    assert (last / "meta.pt").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    aside = tmp_path / ".last.ckpt.old-4242"  # killed after the first rename
    last.rename(aside)
    half = tmp_path / ".last.ckpt.tmp-4242"  # the new save it was about to rename
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"half")
    assert remove_partial(tmp_path) == [half]
    assert (last / "meta.pt").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    aside.mkdir()  # set aside but the new one took the name: the old one just goes
    assert remove_partial(tmp_path) == [] and not aside.exists() and last.is_dir()

    last.rename(aside)  # `ckpt_path` resolution puts it back too (before any rank saves)
    assert put_back(last) and (last / "meta.pt").read_bytes() == b"new" and not aside.exists()
    assert not put_back(last)  # nothing set aside: nothing to do


def test_partial_files_are_never_checkpoints_and_are_removed(tmp_path: Path):
    tmp = partial_name(tmp_path / "last.ckpt")
    assert tmp.name.startswith(".") and not tmp.name.endswith(".ckpt")
    tmp.write_bytes(b"half")
    (tmp_path / "step_0000002.ckpt").write_bytes(b"kept")
    assert remove_partial(tmp_path) == [tmp]
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000002.ckpt"]


# --- a real run, SIGKILLed while it saves ---


def start(run: Path, model: Path, shards: str, scratch: Path, extra: list[str]) -> subprocess.Popen:
    """sdtrain-train saving every step; TMPDIR is the test's, so its leftovers are seen too."""
    args = quiet(model, shards, 100000, every=1) + [f"hydra.run.dir={run}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(scratch))
    log = open(run.parent / "log.txt", "a")  # a file, not a pipe: an unread pipe stalls the run
    return subprocess.Popen(
        [sys.executable, "-m", "sdtrain.cli.train", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def unfinished(folder: Path, scratch: Path) -> list[Path]:
    """Files of a save in progress (or killed): anything but `*.ckpt` in the checkpoint folder,
    anything in the run's TMPDIR."""
    mine = [p for p in folder.iterdir() if p.suffix != ".ckpt"] if folder.is_dir() else []
    return mine + list(scratch.iterdir())


def kill_mid_save(proc: subprocess.Popen, folder: Path, scratch: Path, timeout: float) -> None:
    """SIGKILL `proc` the moment it is seen replacing a complete `last.ckpt`: the file
    `ckpt_path=last` picks (a save writing elsewhere: whatever appears in TMPDIR)."""
    end = time.monotonic() + timeout
    while not (folder / "last.ckpt").exists() or unfinished(folder, scratch):
        assert proc.poll() is None and time.monotonic() < end, "no checkpoint written"
        time.sleep(0.05)
    # saves come every step (~0.1 s): poll hard
    while not (list(folder.glob(".last.ckpt.*")) or list(scratch.iterdir())):
        assert proc.poll() is None and time.monotonic() < end, "no save seen under way"
    proc.kill()
    proc.wait(timeout=30)


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_sigkill_during_a_save_leaves_loadable_checkpoints_and_last_resumes(
    tiny_model: Path, shards: str, tmp_path: Path
):
    run, scratch = tmp_path / "run", tmp_path / "tmpdir"
    scratch.mkdir()
    folder = run / "checkpoints"
    left_partial = False
    for attempt in range(4):  # until a kill lands before the save finished (usually the first)
        resume = ["ckpt_path=last"] if attempt else []
        kill_mid_save(start(run, tiny_model, shards, scratch, resume), folder, scratch, 240)
        left_partial = bool(unfinished(folder, scratch))
        for p in folder.glob("*.ckpt"):  # whatever the kill interrupted, every checkpoint is whole
            torch.load(p, map_location="cpu", weights_only=True)
        if left_partial:
            break
    assert left_partial, "no kill landed inside a save"
    step = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]

    resumed = start(
        run, tiny_model, shards, scratch, ["ckpt_path=last", f"trainer.max_steps={step + 2}"]
    )
    assert resumed.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == step + 2
    assert unfinished(folder, scratch) == []  # the killed save's leftovers are gone


def test_rotation_spares_the_checkpoint_resumed_from(tiny_model: Path, shards: str, tmp_path: Path):
    """Resumed from step 3 through a symlinked run folder (`/scratch` -> `/lustre` on a cluster),
    two saves later rotation reaches step 3: Lightning's path-string check deleted it."""
    run, link = tmp_path / "run", tmp_path / "link"
    train(compose_cfg(run, quiet(tiny_model, shards, 4, every=1)))
    link.symlink_to(run, target_is_directory=True)
    resume_from = link / "checkpoints" / "step_0000003.ckpt"
    overrides = quiet(tiny_model, shards, 6, every=1) + [f"ckpt_path={resume_from}"]
    train(compose_cfg(run, overrides))

    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt",
        "step_0000003.ckpt",  # the resume file, out of the top 2 but kept
        "step_0000005.ckpt",
        "step_0000006.ckpt",
    ]
    assert torch.load(resume_from, weights_only=True)["global_step"] == 3
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6
