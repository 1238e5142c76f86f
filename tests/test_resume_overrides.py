"""A resume trains what the run was (issue 27 item 3): `hydra.run.dir=<run> ckpt_path=last`
alone trains with the overrides the run recorded, new ones on top and listed; a resume of a
resume goes on with the newest record; `ckpt_path=last` without `hydra.run.dir` says to add it.
Before, the first trained the run's checkpoint with the default config (the demo's), and the
last named the empty folder it had just made."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from sdtrain.cli.resume import resume_args, started_at, with_recorded
from tests.conftest import compose_cfg, tiny_overrides
from tests.test_train import _cli


@pytest.fixture(scope="module")
def first_run(tiny_model: Path, shards: str, tmp_path_factory) -> tuple[Path, Path]:
    """(working folder, run): one step trained in outputs/train/runs/first with the tiny model's
    overrides, as a user's first run in the default place."""
    root = tmp_path_factory.mktemp("resume")
    run = root / "outputs" / "train" / "runs" / "first"
    first = tiny_overrides(tiny_model, shards, 1) + ["logger=none", "~callbacks.sample_images"]
    proc = _cli([*first, f"hydra.run.dir={run}"], root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, run


def step_of(run: Path) -> int:
    last = run / "checkpoints" / "last.ckpt"
    return torch.load(last, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_a_resume_trains_with_the_runs_recorded_overrides(first_run, tiny_model: Path, shards: str):
    root, run = first_run
    resume = [f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_steps=2"]
    shown = _cli([*resume, "--cfg", "job"], root, timeout=120)  # what it would train
    assert shown.returncode == 0, shown.stderr[-4000:]
    cfg = OmegaConf.create(shown.stdout)
    assert cfg.model.pretrained == str(tiny_model) and cfg.data.train_shards == shards
    assert cfg.trainer.max_steps == 2 and "sample_images" not in cfg.callbacks

    # a resume stopped by a config mistake leaves no record: the next one would inherit the mistake
    bad = _cli([*resume, "data.batch_size=0"], root, timeout=120)
    assert bad.returncode == 1 and "data.batch_size" in bad.stderr, bad.stderr[-4000:]
    assert not (run / ".hydra" / "resume-1").exists()

    proc = _cli(resume, root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert step_of(run) == 2
    (line,) = [x for x in (proc.stdout + proc.stderr).splitlines() if "resume: " in x]
    assert f"reusing the overrides recorded in {run / '.hydra' / 'overrides.yaml'}: " in line
    assert f"model.pretrained={tiny_model} data.train_shards='{shards}'" in line
    assert line.endswith("; new on top: trainer.max_steps=2 (was 1)")
    trained = OmegaConf.load(run / ".hydra" / "resume-1" / "config.yaml")
    assert trained.model.pretrained == str(tiny_model) and trained.data.num_workers == 0

    # a resume of that resume goes on with its record: trainer.max_steps=2, so nothing to train
    again = _cli([f"hydra.run.dir={run}", "ckpt_path=last"], root, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    out = again.stdout + again.stderr
    assert f"recorded in {run / '.hydra' / 'resume-1' / 'overrides.yaml'}" in out
    assert "is at step 2 and trainer.max_steps=2, so this run is finished" in out
    assert step_of(run) == 2


def test_ckpt_path_last_without_a_run_folder_says_to_add_it(
    first_run, tiny_model: Path, shards: str, monkeypatch: pytest.MonkeyPatch
):
    root, _ = first_run
    monkeypatch.setenv("PWD", str(root))  # paths.root_dir: outputs/ in the working folder
    args = tiny_overrides(tiny_model, shards, 1) + ["logger=none", "ckpt_path=last"]
    proc = _cli(args, root, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "sdtrain-train: ckpt_path=last resumes the run in the folder hydra.run.dir names (its "
        "checkpoints/last.ckpt), and none was given: add hydra.run.dir=<run folder>, e.g. "
        "hydra.run.dir=outputs/train/runs/first"
    )


def test_a_sweep_trial_resumes_as_one_run_in_its_folder(
    first_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A trial's record holds the sweep's `hparams_search=lr_sweep`, which sets
    hydra.mode=MULTIRUN: its resume trains that trial on, it does not launch the sweep again."""
    _, run = first_run
    trial = tmp_path / "multiruns" / "0"
    (trial / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.ckpt", trial / "checkpoints")
    recorded = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    sweep = ["hparams_search=lr_sweep", "model.optimizer.lr=0.0001", "model.min_snr_gamma=null"]
    past = started_at() - 10
    os.utime(record(trial / ".hydra", [*sweep, *recorded]), (past, past))
    monkeypatch.setenv("PWD", str(tmp_path))  # where a sweep would make outputs/
    step = step_of(trial)
    args = [f"hydra.run.dir={trial}", "ckpt_path=last", f"trainer.max_steps={step + 1}"]
    proc = _cli(args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert step_of(trial) == step + 1 and not (tmp_path / "outputs").exists()
    trained = OmegaConf.load(trial / ".hydra" / "resume-1" / "config.yaml")
    assert trained.model.optimizer.lr == 1e-4 and trained.model.min_snr_gamma is None


def record(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "overrides.yaml").write_text(yaml.safe_dump(lines))
    return folder / "overrides.yaml"


def test_new_overrides_win_key_by_key_and_hydra_composes_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_steps=9"]
    assert with_recorded(args) == args  # no record: nothing to reuse
    recorded = [
        "data=webdataset",
        "data.train_shards=/data/x.tar",
        "trainer.max_steps=5",
        "~callbacks.sample_images",
        "+trainer.detect_anomaly=false",  # added: a plain override of it must come after
        "ckpt_path=/old/step_0000005.ckpt",
    ]
    past = started_at() - 10  # written before this process started
    os.utime(record(run / ".hydra", recorded), (past, past))
    given = [*args, "trainer.detect_anomaly=true", "--cfg", "job"]
    merged = with_recorded(given)
    assert merged == [*recorded[:2], *recorded[3:5], *given, "hydra.mode=RUN"]
    assert with_recorded(merged) == merged  # Lightning's DDP processes get the merged line
    assert with_recorded(["-m", *given]) == ["-m", *given]  # a sweep: one folder a job
    fresh = [f"hydra.run.dir={run}", "trainer.max_steps=9"]
    assert with_recorded(fresh) == fresh  # not a resume: a new run in that folder

    cfg = compose_cfg(tmp_path, [a for a in merged if not a.startswith(("hydra.", "-", "job"))])
    assert cfg.trainer.max_steps == 9 and cfg.trainer.detect_anomaly is True
    assert cfg.data._target_.endswith("WebDataModule") and cfg.data.train_shards == "/data/x.tar"
    assert cfg.ckpt_path == "last" and "sample_images" not in cfg.callbacks

    # the newest record written before this process started: a resume's, not this start's own
    os.utime(record(run / ".hydra" / "resume-1", [*recorded, "trainer.max_steps=7"]), (past, past))
    record(run / ".hydra" / "resume-2", ["trainer.max_steps=8"])  # written by rank 0 just now
    assert "trainer.max_steps=7" in with_recorded([f"hydra.run.dir={run}", "ckpt_path=last"])
    assert resume_args(args)[0] == "hydra.output_subdir=.hydra/resume-3"
    flags_first = ["--cfg", "job", "hydra.output_subdir=.hydra/resume-3", "data=webdataset"]
    assert resume_args([*args, "--cfg", "job"])[:4] == flags_first  # argparse takes no other
