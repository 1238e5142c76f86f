"""A mistake found before training leaves no run folder; `outputs/train/runs/latest` keeps
pointing at the newest run; a folder that existed before is never removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.test_train import _cli


def earlier_run(cwd: Path) -> Path:
    """`outputs/train/runs/` as an earlier run left it: its folder and `latest` pointing at it."""
    runs = cwd / "outputs" / "train" / "runs"
    (runs / "2026-01-01_00-00-00" / "checkpoints").mkdir(parents=True)
    (runs / "latest").symlink_to("2026-01-01_00-00-00")
    return runs


@pytest.mark.parametrize(
    "mistake, says",
    [
        ("data.batch_size=0", "data.batch_size=0 must be a whole number >= 1"),  # config_checks
        ("model.pretrained=MISSING", "is not a folder"),  # a missing model folder
        ("+trainer.bogus=1", "takes no argument 'bogus'"),  # a key the trainer does not take
        ("trainer.max_steps=abc", "trainer.max_steps=abc"),  # an error Hydra reports
    ],
)
def test_a_config_mistake_leaves_no_run_folder(
    mistake: str, says: str, tiny_model: Path, shards: str, tmp_path: Path
):
    runs = earlier_run(tmp_path)
    mistake = mistake.replace("MISSING", str(tmp_path / "no-model"))
    args = [a for a in tiny_overrides(tiny_model, shards, 2) if "max_steps" not in a]
    proc = _cli([*args, mistake], tmp_path, timeout=300)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr[-3000:]
    # before: a dated folder holding only .hydra/ and train.log, and `latest` pointing at it
    assert sorted(p.name for p in runs.iterdir()) == ["2026-01-01_00-00-00", "latest"]
    assert os.readlink(runs / "latest") == "2026-01-01_00-00-00"


def test_a_folder_that_existed_is_kept(tiny_model: Path, shards: str, tmp_path: Path):
    """`hydra.run.dir` naming a folder of the user's (or a resume's): a mistake removes nothing."""
    mine = tmp_path / "mine"
    mine.mkdir()
    args = [*tiny_overrides(tiny_model, shards, 2), "data.batch_size=0", f"hydra.run.dir={mine}"]
    proc = _cli(args, tmp_path, timeout=300)
    assert proc.returncode != 0 and "data.batch_size=0" in proc.stderr
    assert mine.is_dir() and (mine / ".hydra").is_dir()
    assert not (tmp_path / "outputs").exists()  # no `latest` for a folder of the user's


def test_a_first_run_mistake_leaves_no_outputs_folder(
    tiny_model: Path, shards: str, tmp_path: Path
):
    """No earlier run: the folders Hydra made for this one (`outputs/train/runs/`) go too (before:
    an empty `outputs/train/runs/` stayed)."""
    args = [*tiny_overrides(tiny_model, shards, 2), "data.batch_size=0"]
    proc = _cli(args, tmp_path, timeout=300)
    assert proc.returncode != 0 and "data.batch_size=0" in proc.stderr
    assert not (tmp_path / "outputs").exists(), sorted(map(str, tmp_path.rglob("*")))
