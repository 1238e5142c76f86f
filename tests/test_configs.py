"""Every config file composes, and everything in it instantiates."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from sdtrain.cli.train import build_model, instantiate_map
from tests.conftest import CONF, compose_cfg, tiny_overrides


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [
    f"{g}={o}"
    for g in (
        "data",
        "model",
        "callbacks",
        "logger",
        "trainer",
        "experiment",
        "hparams_search",
        "debug",
        "paths",
    )
    for o in options(g)
]


@pytest.mark.parametrize("choice", CASES)
def test_config_composes_and_instantiates(
    choice: str, tiny_model: Path, shards: str, tmp_path: Path
):
    group = choice.split("=")[0]
    # the tiny model and shards stand in for the user's own; group choice first so it applies
    overrides = [choice] + [
        o
        for o in tiny_overrides(tiny_model, shards)
        if not o.startswith("callbacks.") or group != "callbacks"
    ]
    if choice.startswith("trainer=gpu"):
        overrides.remove("trainer.accelerator=cpu")
    if choice == "data=mixture":  # a mixture names its shards per source, not in train_shards
        overrides = [o for o in overrides if not o.startswith("data.train_shards=")]
        overrides += [f"data.sources.{i}.shards='{shards}'" for i in range(2)]
    cfg = compose_cfg(tmp_path, overrides + ["trainer.accelerator=cpu"])
    # every interpolation resolves
    OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    hydra.utils.instantiate(cfg.data)
    if group in ("model", "experiment"):
        model = build_model(cfg.model)
        model.configure_optimizers()
    callbacks = instantiate_map(cfg.get("callbacks"))
    loggers = instantiate_map(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    assert trainer.max_steps == (1 if cfg.trainer.get("fast_dev_run") else cfg.trainer.max_steps)
    if choice in ("callbacks=none", "logger=none"):
        assert not (callbacks if group == "callbacks" else loggers)


def test_defaults_are_the_demo(tmp_path: Path):
    cfg = compose_cfg(tmp_path)
    assert cfg.hydra.runtime.choices.data == "demo"
    assert cfg.hydra.runtime.choices.model == "demo"
    assert set(cfg.callbacks) == {
        "sample_images",
        "val_loss",
        "model_checkpoint",
        "throughput",
        "data_sources",
        "report",
        "progress_log",
    }
    assert cfg.model.ema._target_ == "sdtrain.training.ema.EMA"
    assert "wandb" in cfg.logger


def test_own_data_is_not_flipped_by_default(tmp_path: Path):
    """A mirrored glyph, text or asymmetric subject no longer matches its caption."""
    import inspect

    from sdtrain.datamodules.webdataset import WebDataModule

    cfg = compose_cfg(tmp_path, ["experiment=finetune_sd15"])
    assert cfg.data.random_flip is False
    assert inspect.signature(WebDataModule).parameters["random_flip"].default is False


def test_ddp_and_fsdp_train_in_bf16_on_gpus_like_one_gpu(tmp_path: Path):
    """trainer=ddp once built on trainer/default (fp32): a DDP run was half as fast as one GPU in
    bf16 and used twice the memory. Every GPU trainer now computes in bf16 autocast."""
    for trainer in ("gpu", "ddp", "fsdp"):
        cfg = compose_cfg(tmp_path, [f"trainer={trainer}"])
        assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed"), trainer


def leaves(node: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a plain config dict."""
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_state_only_what_differs(experiment: str, tmp_path: Path):
    """An experiment file sets no key to the value its groups already give it."""
    spec = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml"))
    groups = [
        f"{k.removeprefix('override /')}={v}" for d in spec.pop("defaults") for k, v in d.items()
    ]
    cfg = OmegaConf.to_container(compose_cfg(tmp_path, groups))
    unset = object()

    def default(key: str):
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return unset
            node = node[part]
        return node

    repeats = [f"{k}: {v}" for k, v in leaves(spec) if default(k) == v]
    assert not repeats, f"conf/experiment/{experiment}.yaml repeats defaults: {repeats}"
