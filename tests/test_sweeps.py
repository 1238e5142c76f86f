"""Sweeps over the validation loss: a Hydra grid on one latent cache with a W&B run per trial in
one group, the W&B sweep definition's overrides, and a sweep refused without held-out data.

The README's commands run in tests/test_readme.py: a 3-trial Optuna search on the tiny model (its
trial folders, the best parameters and value: `check_optuna` there) and a W&B agent's trial."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from sdtrain.cli.train import instantiate_map, prepare
from tests.conftest import ROOT, compose_cfg, tiny_overrides


@pytest.fixture(autouse=True)
def _no_hydra_left():
    """Tests here set Hydra's global config (a multirun's); later tests must not see it."""
    yield
    HydraConfig.instance().cfg = None


def cli(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath, **env_vars)
    cmd = [sys.executable, "-m", "sdtrain.cli.train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def sweep_args(
    model: Path, shards: str, sweep_dir: Path, steps: int = 2, logger: str = "none"
) -> list[str]:
    """Tiny trials: few steps, no worker processes, the validation callback alone, no logger
    (unless given), the last test shard held out."""
    keep = [o for o in tiny_overrides(model, shards, steps) if not o.startswith("callbacks.")]
    return [
        *keep,
        "data.val_split_shards=1",
        "callbacks=val_loss",
        "callbacks.val_loss.timesteps=2",
        f"logger={logger}",
        f"hydra.sweep.dir={sweep_dir}",
    ]


def trial_values(log_text: str) -> list[float]:
    """The val/loss_ema each trial returned, from the validation callback's log lines."""
    return [float(v) for v in re.findall(r"val/loss_ema ([0-9.]+)", log_text)]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}  # fmt: skip


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_grid_trials_share_one_latent_cache_and_one_wandb_group(
    tiny_model: Path, shards: str, tmp_path: Path
):
    from sdtrain.cli.cache_latents import main as cache_latents
    from tests.wandb_files import offline_run, run_record

    cache = tmp_path / "latents"
    cache_latents([shards, str(cache), "--pretrained", str(tiny_model), "--resolution", "32",
                   "--num-workers", "0", "--samples-per-shard", "32", "--accelerator", "cpu"])  # fmt: skip
    before = snapshot(cache)
    sweep = tmp_path / "grid"
    args = ["-m", "data=latents", "model.optimizer.lr=0.0001,0.003"]
    args += sweep_args(tiny_model, str(cache), sweep, steps=3, logger="wandb")
    proc = cli(args, tmp_path, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert snapshot(cache) == before  # read, never written: no trial encoded anything again
    table = (sweep / "runs.txt").read_text()
    rows = [line.split() for line in table.splitlines()[2:]]
    assert "val/loss_ema as train() returned it" in table
    assert [r[2] for r in rows[1:]] == ["model.optimizer.lr=0.0001", "model.optimizer.lr=0.003"]
    returned = [float(r[1]) for r in rows[1:]]
    for i, value in enumerate(returned):  # each trial returned its own last val/loss_ema
        assert trial_values((sweep / str(i) / "train.log").read_text())[-1] == pytest.approx(
            value, rel=1e-5
        )
    assert returned[0] != returned[1]
    runs = [run_record(offline_run(sweep / str(i))) for i in range(2)]  # each trial's own W&B run
    assert runs[0].run_id != runs[1].run_id
    assert [r.run_group for r in runs] == ["grid", "grid"]  # one group: the sweep folder's name


def multirun(cfg, sweep_dir: Path) -> None:
    """Make `cfg` a multirun job's config (as a trial of `sdtrain-train -m` sees it)."""
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep_dir)
    HydraConfig.instance().set_config(cfg)


def test_a_sweep_without_heldout_data_is_refused_before_training(
    tiny_model: Path, shards: str, tmp_path: Path
):
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards))
    assert prepare(cfg) is not None  # a single run may go on (and return train/loss)
    multirun(cfg, tmp_path / "sweep")
    with pytest.raises(ValueError, match="optimized_metric=val/loss_ema would never be logged: "
                       "no held-out data"):  # fmt: skip
        prepare(cfg)
    with open_dict(cfg):
        cfg.data.val_split_shards = 1
    assert prepare(cfg) is not None


def wandb_overrides(spec: dict) -> list[str]:
    """What `${args_no_hyphens}` expands to for one sample of the sweep's parameters: the first
    value of a list, the lower bound of a range."""
    out = []
    for key, p in spec["parameters"].items():
        value = p["values"][0] if "values" in p else p.get("value", p.get("min"))
        out.append(f"{key}={value}")
    return out


def test_wandb_sweep_parameters_are_train_overrides(tiny_model: Path, shards: str, tmp_path: Path):
    spec = yaml.safe_load((ROOT / "scripts" / "wandb_sweep.yaml").read_text())
    assert spec["command"] == ["${env}", "sdtrain-train", "${args_no_hyphens}"]
    assert spec["metric"] == {"name": "val/loss_ema", "goal": "minimize"}
    overrides = wandb_overrides(spec)
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards) + overrides)
    for o in overrides:  # each lands on the key it names, with its value
        key, value = o.split("=", 1)
        got = OmegaConf.select(cfg, key)
        assert float(got) == float(value), o
    assert cfg.optimized_metric == spec["metric"]["name"]


def test_each_multirun_is_one_wandb_group(tiny_model: Path, shards: str, tmp_path: Path):
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards))
    assert instantiate_map(cfg.logger)[0]._wandb_init.get("group") is None  # a single run
    multirun(cfg, tmp_path / "multiruns" / "lr-search")
    (logger,) = instantiate_map(cfg.logger)
    assert logger._wandb_init["group"] == "lr-search"
