"""Shared fixtures: a tiny model, tiny shards, composed configs, and one real demo run; CI runs the slow
tests too (pytest_configure)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

_CI_RUNS_SLOW = pytest.StashKey[bool]()
_SLOW_DEADLINE = pytest.StashKey[float]()
# CI's limit is 90 min with the install; a slow test starts only within this many seconds of
# the session's start, so the longest one (~10 min) still ends inside the limit.
CI_SLOW_BUDGET_S = float(os.environ.get("SDTRAIN_CI_SLOW_BUDGET_S", "3900"))
LEARNING_CHECKS = {
    "test_demo.py",
    "test_parity.py",
}  # slow tests CI runs before the other slow ones


def _marks_given(args: list[str]) -> bool:
    """Whether the command line (or PYTEST_ADDOPTS) chose markers itself: `-m EXPR` or `-mEXPR`."""
    args = args + shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    return any(a.startswith("-m") for a in args)


def pytest_configure(config: pytest.Config) -> None:
    """CI (CI=true) runs the slow tests too: plain `pytest` there drops pyproject's `-m 'not slow'`.

    An explicit `-m` on the command line is kept as given.
    """
    if (
        os.environ.get("CI", "").lower() == "true"
        and config.option.markexpr == "not slow"
        and not _marks_given(list(config.invocation_params.args))
    ):
        config.option.markexpr = ""
        config.stash[_CI_RUNS_SLOW] = True
        config.stash[_SLOW_DEADLINE] = time.monotonic() + CI_SLOW_BUDGET_S


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In CI the default tests run first, then those marked slow for time only
    (`@pytest.mark.slow(ci="first")`: multi-process and end-to-end checks that would keep plain
    `pytest` past ~10 minutes), then the slow learning checks (the judged demos and the parity
    run), then the other slow ones, each group in its own order."""

    def group(item: pytest.Item) -> int:
        slow = item.get_closest_marker("slow")
        if slow is None:
            return 0
        if slow.kwargs.get("ci") == "first":
            return 1
        return 2 if item.path.name in LEARNING_CHECKS else 3

    if config.stash.get(_CI_RUNS_SLOW, False):
        items.sort(key=group)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """In CI a slow test that would start past the time budget is skipped, and says so."""
    deadline = item.config.stash.get(_SLOW_DEADLINE, None)
    if deadline is not None and item.get_closest_marker("slow") and time.monotonic() > deadline:
        pytest.skip(
            f"CI time budget: slow tests start only in the first {CI_SLOW_BUDGET_S:.0f} s "
            "(SDTRAIN_CI_SLOW_BUDGET_S); `pytest -m slow` runs it"
        )


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.stash.get(_CI_RUNS_SLOW, False):
        return (
            "CI=true: the slow tests run too (pyproject's -m 'not slow' dropped), after the "
            f"others, those that would start past {CI_SLOW_BUDGET_S:.0f} s skipped"
        )
    return None


@pytest.fixture(autouse=True, scope="session")
def _hermetic_env(tmp_path_factory):
    """No W&B credentials, no prompts, and a cache of our own."""
    mp = pytest.MonkeyPatch()
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        mp.delenv(var, raising=False)
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("NETRC", str(tmp_path_factory.mktemp("netrc") / "none"))
    mp.setenv("SDTRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny SD folder; a short VAE fit is enough for tests that do not judge images."""
    from sdtrain.demo.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-sd", vae_steps=20)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """96 demo samples in 4 shards written by sdtrain-shards in folder order (the classes take
    turns); returns the brace pattern."""
    from sdtrain.cli.shards import main as shards_main
    from sdtrain.demo import shapes as demo

    base = tmp_path_factory.mktemp("shards")
    demo.write_folder(base / "images", 96, 32)
    shards_main(
        [str(base / "images"), str(base / "tars"), "--samples-per-shard", "24", "--keep-order"]
    )
    return str(base / "tars" / "{00000..00003}.tar")


def cpu_trainer(**kw):
    """A bare Lightning Trainer on the CPU: no logger, checkpoints, bar or summary unless given."""
    import lightning as L

    base = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(base | kw))


def compose_cfg(tmp: Path, overrides: list[str] | None = None) -> DictConfig:
    """The train config as `sdtrain-train` would see it, with hydra's run info filled in."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides or [], return_hydra_config=True)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def tiny_overrides(model: Path, shards: str, steps: int = 4) -> list[str]:
    """Train on the tiny model and test shards, CPU, few steps, no worker processes."""
    return [
        f"model.pretrained={model}",
        f"data.train_shards='{shards}'",
        "data.val_shards=null",  # no validation loss (tests of it turn it on)
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.accelerator=cpu",
        f"trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
        "callbacks.sample_images.num_inference_steps=2",
        f"callbacks.sample_images.every_n_steps={steps}",
        f"callbacks.model_checkpoint.every_n_train_steps={max(1, steps // 2)}",
    ]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The README's demo command, exactly: `sdtrain-train` with no overrides but the run folder.

    Made from nothing (empty cache), so it covers first use; ~2.6 min on an idle 2-core CPU (1200 steps).
    """
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    env = dict(os.environ, SDTRAIN_CACHE=str(tmp_path_factory.mktemp("demo-cache")))
    cmd = [sys.executable, "-m", "sdtrain.cli.train", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL folder (`sdtrain-tiny-model --family sdxl`); a short VAE fit, as `tiny_model`."""
    from sdtrain.demo.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("model") / "tiny-sdxl", vae_steps=20)
