"""Resume tells the truth: a finished run says so and how to extend it; a resumed run keeps the
first run's Hydra record and writes its own beside it, and the LR schedule it had (issue 26,
item 7: a cosine resumed with a larger trainer.max_steps jumped back to about half its peak)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from diffusers.optimization import get_scheduler
from omegaconf import open_dict

from sdtrain.artifacts import checkpoint
from sdtrain.cli.resume import resume_record
from sdtrain.cli.train import prepare, train
from tests.conftest import ROOT, compose_cfg, tiny_overrides
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


@pytest.mark.slow  # ~22 s; CI runs it
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


# ------------------------------------------------------------------ the LR schedule across a resume

WARMUP, HORIZON = 1, 4  # the first run: cosine over trainer.max_steps=4, one warm-up step
COSINE = ["model.lr_scheduler.name=cosine", f"model.lr_scheduler.num_warmup_steps={WARMUP}"]


class LrProbe(L.Callback):
    """The LR each optimizer step trains with, by step (what `train/lr` logs)."""

    instances: list[LrProbe] = []

    def __init__(self):
        self.lrs: dict[int, float] = {}
        LrProbe.instances.append(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def lrs_of(cfg) -> dict[int, float]:
    with open_dict(cfg):
        cfg.callbacks.lr_probe = {"_target_": "tests.test_resume.LrProbe"}
    train(cfg)
    return LrProbe.instances[-1].lrs


def cosine_overrides(tiny_model: Path, shards: str) -> list[str]:
    base = tiny_overrides(tiny_model, shards, HORIZON) + ["logger=none", "~callbacks.sample_images"]
    return base + COSINE


def diffusers_lr(peak: float, horizon: int, step: int) -> float:
    """The LR diffusers' cosine schedule over `horizon` steps gives at `step`, on a dummy
    optimizer: what the run is meant to follow (past the horizon: its final value, at it)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_scheduler("cosine", opt, num_warmup_steps=WARMUP, num_training_steps=horizon)
    for _ in range(min(step, horizon)):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


@pytest.fixture(scope="module")
def cosine_run(tiny_model: Path, shards: str, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """A finished 4-step cosine run (checkpoints at steps 2 and 4) and the LR of its steps."""
    run = tmp_path_factory.mktemp("cosine")
    return run, lrs_of(compose_cfg(run, cosine_overrides(tiny_model, shards)))


def test_a_resume_with_more_steps_keeps_the_recorded_lr_horizon(
    cosine_run, tiny_model: Path, shards: str, tmp_path: Path, caplog
):
    """trainer.max_steps 4 -> 8, as the finished run's message suggests: the LR stays at the end
    of the recorded schedule (0), where it jumped to the horizon-8 cosine (0.39 x the peak at
    step 5, 0.19 x at 6); the log says why."""
    first_run, first = cosine_run
    peak = compose_cfg(tmp_path, cosine_overrides(tiny_model, shards)).model.optimizer.lr
    assert first == pytest.approx({s: diffusers_lr(peak, HORIZON, s) for s in range(HORIZON)})

    resume = [f"ckpt_path={first_run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=8"]
    with caplog.at_level(logging.WARNING, logger="sdtrain.cli.train"):
        resumed = lrs_of(compose_cfg(tmp_path, cosine_overrides(tiny_model, shards) + resume))
    assert sorted(resumed) == [4, 5, 6, 7]
    recorded = {s: diffusers_lr(peak, HORIZON, s) for s in resumed}  # its final value, 0
    assert resumed == pytest.approx(recorded, abs=1e-12)
    assert max(resumed.values()) < 0.1 * peak  # not back near half the peak
    assert "the LR schedule keeps its recorded horizon of 4 steps (cosine)" in caplog.text
    assert "after it the LR stays at its final value" in caplog.text
    assert checkpoint.lr_horizon(checkpoint.load(first_run / "checkpoints" / "last.ckpt")) == 4
    last = checkpoint.load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 8 and checkpoint.lr_horizon(last) == 4


def test_a_resume_mid_schedule_with_more_steps_goes_on_with_it(
    cosine_run, tiny_model: Path, shards: str, tmp_path: Path
):
    """From step 2 of the 4-step cosine with trainer.max_steps=8: steps 2 and 3 get the recorded
    schedule's LR (0.75 and 0.25 x the peak; the horizon-8 cosine gave 0.81 at step 3), then its
    final value."""
    first_run, first = cosine_run
    peak = compose_cfg(tmp_path, cosine_overrides(tiny_model, shards)).model.optimizer.lr
    mid = first_run / "checkpoints" / "step_0000002.ckpt"
    resume = [f"ckpt_path={mid}", "trainer.max_steps=8"]
    resumed = lrs_of(compose_cfg(tmp_path, cosine_overrides(tiny_model, shards) + resume))
    assert sorted(resumed) == list(range(2, 8))
    assert resumed[2] == pytest.approx(first[2]) and resumed[3] == pytest.approx(first[3])
    assert resumed == pytest.approx({s: diffusers_lr(peak, HORIZON, s) for s in resumed}, abs=1e-12)


def test_a_horizon_set_explicitly_on_resume_replaces_the_recorded_one(
    cosine_run, tiny_model: Path, shards: str, tmp_path: Path, caplog
):
    """model.lr_scheduler.num_training_steps=8 on the resume: a new schedule on purpose, with a
    warning; its checkpoints record 8, not the 4 the scheduler's restored state held."""
    first_run, _ = cosine_run
    peak = compose_cfg(tmp_path, cosine_overrides(tiny_model, shards)).model.optimizer.lr
    resume = [
        f"ckpt_path={first_run / 'checkpoints' / 'last.ckpt'}",
        "trainer.max_steps=6",
        "model.lr_scheduler.num_training_steps=8",
    ]
    with caplog.at_level(logging.WARNING, logger="sdtrain.cli.train"):
        resumed = lrs_of(compose_cfg(tmp_path, cosine_overrides(tiny_model, shards) + resume))
    assert "model.lr_scheduler.num_training_steps=8 replaces the horizon of 4 steps" in caplog.text
    assert resumed[5] == pytest.approx(diffusers_lr(peak, 8, 5))
    assert checkpoint.lr_horizon(checkpoint.load(tmp_path / "checkpoints" / "last.ckpt")) == 8


def test_an_old_checkpoint_without_a_horizon_says_so(
    tiny_model: Path, shards: str, tmp_path: Path, caplog
):
    """The schema-1 fixture records no horizon: the schedule follows the config, with a hint."""
    v1 = ROOT / "tests" / "fixtures" / "checkpoint_v1.ckpt"
    overrides = cosine_overrides(tiny_model, shards) + [f"ckpt_path={v1}", "trainer.max_steps=8"]
    cfg = compose_cfg(tmp_path, overrides)
    with caplog.at_level(logging.WARNING, logger="sdtrain.cli.train"):
        assert prepare(cfg) is not None
    assert cfg.model.lr_scheduler.num_training_steps == 8
    assert "records no LR schedule horizon" in caplog.text
    assert "model.lr_scheduler.num_training_steps=<that>" in caplog.text
