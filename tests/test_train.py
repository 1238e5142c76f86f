"""The entry point end to end on the tiny model: fast_dev_run, a short run, resume, DDP, sweeps."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from sdtrain.artifacts import checkpoint
from sdtrain.cli.train import train
from sdtrain.runtime.loggers import wandb_has_credentials
from tests.conftest import ROOT, compose_cfg, tiny_overrides


class StepLosses(L.Callback):
    """The loss each training step returned (built from config like any callback)."""

    instances: list[StepLosses] = []

    def __init__(self):
        self.losses: list[float] = []
        StepLosses.instances.append(self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_fast_dev_run(tiny_model: Path, shards: str, tmp_path: Path, caplog):
    """One step; train() returns optimized_metric's value. The config's val/loss_ema needs
    held-out data, which this run has none of (data.val_shards=null): outside a sweep that is a
    warning and train/loss is returned, the loss of the step."""
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards) + ["debug=fast", "logger=none"])
    assert cfg.optimized_metric == "val/loss_ema" and cfg.data.val_shards is None
    with open_dict(cfg):
        cfg.callbacks.step_losses = {"_target_": "tests.test_train.StepLosses"}
    with caplog.at_level("WARNING", logger="sdtrain.training.validation"):
        value = train(cfg)
    (loss,) = StepLosses.instances[-1].losses  # fast_dev_run: one step
    assert value == pytest.approx(loss, rel=1e-6, abs=0) and 0 < value < 10
    assert "no held-out data: val/loss_ema not logged" in caplog.text
    assert "returning train/loss" in caplog.text


def test_short_run_logs_loss_lr_and_skips(tiny_model: Path, shards: str, tmp_path: Path):
    cfg = compose_cfg(
        tmp_path,
        tiny_overrides(tiny_model, shards, steps=6)
        + ["logger=csv", "trainer.log_every_n_steps=1", "callbacks.throughput.window=3"],
    )
    loss = train(cfg)
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(6))
    # no held-out data (val_shards=null): train() falls back to train/loss, the last step's
    last = [float(r["train/loss"]) for r in rows if r["train/loss"]][-1]
    assert loss == pytest.approx(last, rel=1e-6, abs=0) and torch.isfinite(torch.tensor(loss))
    lrs = [float(r["train/lr"]) for r in rows if r["train/lr"]]
    assert lrs == sorted(lrs) and lrs[0] < lrs[-1]  # warming up
    assert all(float(r["data/skipped"]) == 0 for r in rows if r["data/skipped"])
    assert any(float(r.get("perf/img_per_s") or 0) > 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "step_0000003.ckpt",
        "step_0000006.ckpt",
    ]
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step_0000006.png"]


class Probe(L.Callback):
    """Records what the run starts from and ends with; built from config like any callback."""

    instances: list[Probe] = []

    def __init__(self):
        Probe.instances.append(self)

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        ema = pl_module.ema
        self.start = {
            "step": trainer.global_step,
            "opt_step": int(next(iter(opt.state.values()))["step"]) if opt.state else 0,
            "sched_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            "ema_updates": ema.num_updates,
            "ema_shadow": {k: v.detach().cpu().clone() for k, v in ema.shadow.items()},
            "unet": {k: v.clone() for k, v in pl_module.unet.state_dict().items()},
        }

    def on_train_end(self, trainer, pl_module):
        self.end = {"step": trainer.global_step, "lr": trainer.optimizers[0].param_groups[0]["lr"]}


def run_with_probe(cfg) -> Probe:
    with open_dict(cfg):
        cfg.callbacks.probe = {"_target_": "tests.test_train.Probe"}
    train(cfg)
    return Probe.instances[-1]


def test_resume_from_checkpoint_continues(tiny_model: Path, shards: str, tmp_path: Path):
    full = run_with_probe(
        compose_cfg(tmp_path / "full", tiny_overrides(tiny_model, shards, 6) + ["logger=none"])
    )
    mid = tmp_path / "full" / "checkpoints" / "step_0000003.ckpt"
    saved = checkpoint.load(mid)
    resumed = run_with_probe(
        compose_cfg(
            tmp_path / "resumed",
            tiny_overrides(tiny_model, shards, 6) + ["logger=none", f"ckpt_path={mid}"],
        )
    )
    s = resumed.start
    assert (s["step"], s["opt_step"], s["sched_epoch"], s["ema_updates"]) == (3, 3, 3, 3)
    assert all(torch.equal(v, saved["state_dict"][f"unet.{k}"]) for k, v in s["unet"].items())
    saved_ema = checkpoint.ema_state(saved)["shadow"]
    assert s["ema_shadow"].keys() == saved_ema.keys()
    assert all(torch.equal(v, saved_ema[k]) for k, v in s["ema_shadow"].items())
    assert any(not torch.equal(saved_ema[k], s["unet"][k]) for k in saved_ema)  # EMA != raw
    assert resumed.end["step"] == full.end["step"] == 6
    assert resumed.end["lr"] == pytest.approx(full.end["lr"])  # same point on the LR schedule
    last = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6 and checkpoint.ema_state(last)["num_updates"] == 6
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in last["state_dict"])


def test_resume_last_in_same_run_folder(tiny_model: Path, shards: str, tmp_path: Path):
    base = tiny_overrides(tiny_model, shards, 4) + ["logger=none"]
    train(compose_cfg(tmp_path, base))
    probe = run_with_probe(compose_cfg(tmp_path, base + ["trainer.max_steps=6", "ckpt_path=last"]))
    assert probe.start["step"] == 4 and probe.end["step"] == 6


def test_wandb_offline_without_credentials(tmp_path: Path, monkeypatch):
    assert not wandb_has_credentials()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai login user password abc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_has_credentials()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_has_credentials()


def _cli(
    args: list[str], tmp_path: Path, timeout: int = 600, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`sdtrain-train args` in a subprocess run in `tmp_path` (PWD too, as a shell sets it: the
    configs put `outputs/` there), without the `unset` variables."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        PWD=str(tmp_path),
    )
    for name in unset:
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "sdtrain.cli.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ddp_two_processes_on_cpu(tiny_model: Path, shards: str, tmp_path: Path, monkeypatch):
    from tests.training.test_training_step import read_records

    args = tiny_overrides(tiny_model, shards, 4) + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=2",
        "logger=csv",
        "model._target_=tests.training.recording.RecordingModule",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    monkeypatch.setenv("SDTRAIN_RECORD_DIR", str(tmp_path))
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert (tmp_path / "run" / "samples" / "step_0000004.png").is_file()
    ranks = read_records(tmp_path)
    assert sorted(ranks) == [0, 1] and sorted(ranks[0]) == sorted(ranks[1]) == [0, 1, 2, 3]
    for step in range(4):  # each rank draws its own timesteps (and noise, dropout)
        assert ranks[0][step] != ranks[1][step], step


# The README's `sdtrain-train hparams_search=lr_sweep` runs these 4 trials too (tests/test_readme.py
# checks a checkpoint per trial; slow as well); the default suite runs 2-trial grids
# (tests/test_sweeps.py, tests/runtime/test_sweep_table.py) and composes lr_sweep (test_configs).
@pytest.mark.slow
def test_hparams_sweep_multirun(tiny_model: Path, shards: str, tmp_path: Path):
    keep = [o for o in tiny_overrides(tiny_model, shards, 2) if not o.startswith("callbacks.")]
    args = [
        "-m",
        *keep,
        "hparams_search=lr_sweep",
        "logger=none",
        "callbacks=none",
        "optimized_metric=train/loss",  # no val_loss callback here
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == [
        "0",
        "1",
        "2",
        "3",
    ]


def test_resume_logs_on_into_the_same_wandb_run(tiny_model: Path, shards: str, tmp_path: Path):
    from tests.wandb_files import history, run_id

    base = tiny_overrides(tiny_model, shards, 2) + ["trainer.log_every_n_steps=1"]
    train(compose_cfg(tmp_path, base))
    train(compose_cfg(tmp_path, base + ["trainer.max_steps=4", "ckpt_path=last"]))
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # one run id (two folders, or one when both started within the same second)
    assert len({run_id(r) for r in runs}) == 1, runs
    steps = [r["trainer/global_step"] for run in runs for r in history(run) if "train/loss" in r]
    assert steps == [0, 1, 2, 3]


def test_missing_checkpoint_is_named(tiny_model: Path, shards: str, tmp_path: Path):
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards) + ["ckpt_path=last"])
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        train(cfg)


def test_unset_mandatory_keys_are_named(tmp_path: Path):
    cfg = compose_cfg(tmp_path, ["experiment=finetune_sd15"])
    with pytest.raises(ValueError, match=r"data.train_shards, model.pretrained"):
        train(cfg)


def test_list_shards_and_dict_unet_config_checkpoint_loads_and_resumes(
    tiny_model: Path, shards: str, tmp_path: Path
):
    import json

    from sdtrain.datamodules.webdataset import expand_shards

    base = tiny_overrides(tiny_model, shards, 2) + ["logger=none"]
    cfg = compose_cfg(tmp_path, base)
    with open_dict(cfg):  # what a YAML list and an inline dict give: OmegaConf containers
        cfg.data.train_shards = expand_shards(shards)
        cfg.model.unet_config = json.loads((tiny_model / "unet" / "config.json").read_text())
    train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert type(checkpoint.run_info(checkpoint.upgrade(ckpt))["unet_config"]) is dict
    assert type(ckpt["datamodule_hyper_parameters"]["train_shards"]) is list
    with open_dict(cfg):
        cfg.trainer.max_steps = 3
        cfg.ckpt_path = str(last)
    probe = run_with_probe(cfg)
    assert probe.start["step"] == 2 and probe.end["step"] == 3


def test_accumulation_ema_and_samples_once_per_optimizer_step(
    tiny_model: Path, shards: str, tmp_path: Path
):
    base = tiny_overrides(tiny_model, shards, 4) + [
        "logger=none",
        "trainer.accumulate_grad_batches=2",
        "callbacks.sample_images.every_n_steps=2",
    ]
    train(compose_cfg(tmp_path / "full", base))
    last = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and checkpoint.ema_state(last)["num_updates"] == 4
    samples = sorted(p.name for p in (tmp_path / "full" / "samples").glob("*.png"))
    assert samples == ["step_0000002.png", "step_0000004.png"]  # none at step 0
    # resumed mid-run: no extra EMA update or sample round before the next optimizer step
    mid = tmp_path / "full" / "checkpoints" / "step_0000002.ckpt"
    train(compose_cfg(tmp_path / "resumed", base + [f"ckpt_path={mid}"]))
    last = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert checkpoint.ema_state(last)["num_updates"] == 4
    samples = sorted(p.name for p in (tmp_path / "resumed" / "samples").glob("*.png"))
    assert samples == ["step_0000004.png"]


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("data.batch_size=0", ValueError, r"data.batch_size=0 must be a whole number >= 1"),
        ("data.num_workers=-1", ValueError, r"data.num_workers=-1"),
        (
            "data.resolution=31",
            ValueError,
            r"data.resolution=31 is not a multiple of 2.*use 30 or 32",
        ),
        ("model.pretrained=EMPTY", FileNotFoundError, r"model.pretrained: .*lacks unet/, vae/"),
    ],
)
def test_config_errors_fail_before_a_model_is_built(
    override: str,
    error: type,
    match: str,
    tiny_model: Path,
    shards: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """Each bad value is named (key and value) before any weights load."""
    import sdtrain.cli.train as T

    (tmp_path / "empty").mkdir()
    override = override.replace("EMPTY", str(tmp_path / "empty"))
    built = []
    monkeypatch.setattr(T, "build_model", lambda cfg: built.append(cfg) or 1 / 0)
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards) + [override])
    with pytest.raises(error, match=match):
        train(cfg)
    assert built == []


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_uneven_shards_on_two_ranks_never_hang(tiny_model: Path, tmp_path: Path):
    """Shards of 50, 10 and 3 samples over 2 DDP processes, resampled=false, batch 16, more steps
    than one pass: every rank keeps stepping (the run ends), within a time limit."""
    from tests.datamodules.test_webdataset import png, write_tar

    sample = {"png": png(32), "txt": b"a red square"}
    for name, count in (("a", 50), ("b", 10), ("c", 3)):
        write_tar(tmp_path / f"{name}.tar", [sample] * count)
    args = tiny_overrides(tiny_model, str(tmp_path), 8) + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=2",
        "logger=csv",
        "data.resampled=false",
        "data.batch_size=16",
        "data.resolution=32",
        "~callbacks.sample_images",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = _cli(args, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8


@pytest.mark.parametrize("experiment", ["pretrain", "finetune", "finetune_sd15"])
def test_each_experiment_trains_the_tiny_model(
    experiment: str, tiny_model: Path, shards: str, tmp_path: Path
):
    """Every conf/experiment file trains as written but for the size (2 CPU steps at 32 px); LoRA's
    is run by tests/models/test_lora.py. pretrain's U-Net starts fresh: its weights are not the
    folder's."""
    from diffusers import UNet2DConditionModel

    args = tiny_overrides(tiny_model, shards, 2) + [
        f"experiment={experiment}",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "data.resolution=32",
        "data.batch_size=4",
        "data.bucket_step=8",
        "logger=none",
        "~callbacks.sample_images",
    ]
    cfg = compose_cfg(tmp_path, args)
    assert cfg.task_name == experiment
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
    key = "conv_in.weight"
    moved = (ckpt["state_dict"][f"unet.{key}"] - base[key]).abs().max().item()
    assert (moved > 0.01) if experiment == "pretrain" else (0 < moved < 0.01)
