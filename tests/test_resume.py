"""Resume tells the truth: a finished run says so and how to extend it; a resumed run keeps the
first run's Hydra record and writes its own beside it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from sdtrain.cli.train import resume_record, train
from tests.conftest import compose_cfg, tiny_overrides
from tests.test_train import _cli


def test_resuming_a_finished_run_says_so_and_trains_nothing(
    tiny_model: Path, shards: str, tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
):
    import sdtrain.cli.train as T

    base = tiny_overrides(tiny_model, shards, 2) + ["logger=none"]
    train(compose_cfg(tmp_path, base))
    built = []
    monkeypatch.setattr(T, "build_model", lambda cfg: built.append(cfg) or 1 / 0)
    with caplog.at_level(logging.WARNING, logger="sdtrain.cli.train"):
        assert train(compose_cfg(tmp_path, base + ["ckpt_path=last"])) is None
    assert built == []
    (message,) = [r.getMessage() for r in caplog.records if "nothing to train" in r.getMessage()]
    assert "last.ckpt is at step 2 and trainer.max_steps=2, so this run is finished" in message
    assert f"hydra.run.dir={tmp_path} ckpt_path=last trainer.max_steps=4" in message


def hydra_record(folder: Path) -> list[str]:
    return yaml.safe_load((folder / "overrides.yaml").read_text())


def test_a_resume_keeps_the_first_runs_hydra_record(tiny_model: Path, shards: str, tmp_path):
    run = tmp_path / "run"
    first = tiny_overrides(tiny_model, shards, 1) + ["logger=none", "~callbacks.sample_images"]
    proc = _cli([*first, f"hydra.run.dir={run}"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    original = {p.name: p.read_text() for p in (run / ".hydra").glob("*.yaml")}
    assert set(original) == {"config.yaml", "hydra.yaml", "overrides.yaml"}

    more = [*first, f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_steps=2"]
    proc = _cli(more, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the finished run again: exit 0, its own record, the way on in the log
    proc = _cli(more, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "so this run is finished" in proc.stdout + proc.stderr

    assert {p.name: p.read_text() for p in (run / ".hydra").glob("*.yaml")} == original
    assert "ckpt_path=last" not in hydra_record(run / ".hydra")
    for n in (1, 2):
        resumed = run / ".hydra" / f"resume-{n}"
        assert {"ckpt_path=last", "trainer.max_steps=2"} <= set(hydra_record(resumed))
        assert (resumed / "config.yaml").is_file()
    assert not (run / ".hydra" / "resume-3").exists()


def test_resume_record_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "ckpt_path=last"]
    assert resume_record(args) == args  # no record yet: a fresh folder
    (run / ".hydra" / "resume-1").mkdir(parents=True)
    assert resume_record(args) == ["hydra.output_subdir=.hydra/resume-2", *args]
    quoted = [f'hydra.run.dir="{run}"', "ckpt_path=/x/step_0000300.ckpt"]  # as Lightning quotes
    assert resume_record(quoted)[0] == "hydra.output_subdir=.hydra/resume-2"
    for same in (
        [f"hydra.run.dir={run}"],  # not a resume
        [f"hydra.run.dir={run}", "ckpt_path=null"],
        ["ckpt_path=last"],  # a new run folder of its own
        [*args, "hydra.output_subdir=null"],  # set already (Lightning's DDP processes)
        ["-m", *args],  # a sweep: one folder a job
    ):
        assert resume_record(same) == same
    monkeypatch.setenv("RANK", "1")  # torchrun's other ranks: rank 0 writes the record
    assert resume_record(args) == [*args, "hydra.output_subdir=null"]
