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


# experiment=demo_sdxl makes the tiny SDXL with its VAE fit (~40 s): slow (CI runs it); the SDXL
# experiments below and tests/test_demo.py's SDXL demo cover the same composition.
SLOW_CASES = {"experiment=demo_sdxl"}


@pytest.mark.parametrize(
    "choice",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES],
)
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
    if "dreambooth" in choice:  # its instance and class sets name the shards
        overrides = [o for o in overrides if not o.startswith("data.train_shards=")]
        overrides += [f"data.dreambooth.{k}_shards='{shards}'" for k in ("instance", "class")]
        overrides += ["data.dreambooth.class_images.prompt=a square"]
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
    groups = []
    for d in spec.pop("defaults", []):
        if isinstance(d, str):  # an experiment built on another (sdxl_lora: `- lora`), or _self_
            groups += [] if d == "_self_" else [f"experiment={d}"]
        else:
            groups += [f"{k.removeprefix('override /')}={v}" for k, v in d.items()]
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


# A tiny SDXL stands in for SDXL base: two CPU steps at 32 px (buckets of 8 px steps: 24x40,
# 32x32, 40x24), each experiment's own settings otherwise (gradient checkpointing, min-SNR, ...).
SDXL_TINY = [
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "data.resolution=32",
    "data.bucket_step=8",
    "callbacks.sample_images.height=32",
    "callbacks.sample_images.width=32",
    "logger=none",
]


def sdxl_run(tmp: Path, tiny_sdxl: Path, shards: str, *overrides: str) -> dict:
    """Train two steps with `overrides` on the tiny SDXL; the checkpoint it leaves."""
    import torch

    from sdtrain.cli.train import train

    base = tiny_overrides(tiny_sdxl, shards, steps=2)
    train(compose_cfg(tmp, [*overrides, *base, *SDXL_TINY]))
    return torch.load(tmp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("experiment", ["sdxl_finetune", "sdxl_lora"])
def test_sdxl_experiments_train_an_sdxl(
    experiment: str, tiny_sdxl: Path, shards: str, tmp_path: Path
):
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", f"model.pretrained={tiny_sdxl}"])
    assert (cfg.data.resolution, cfg.data.buckets) == (1024, "auto")  # about 1024 x 1024 px
    assert cfg.model.gradient_checkpointing and cfg.model.min_snr_gamma == 5.0
    assert cfg.callbacks.sample_images.height == cfg.callbacks.sample_images.width == 1024
    ckpt = sdxl_run(tmp_path, tiny_sdxl, shards, f"experiment={experiment}")
    assert ckpt["global_step"] == 2
    keys = ckpt["state_dict"].keys()
    if experiment == "sdxl_lora":  # the adapters alone train and are kept
        assert keys and all("lora_" in k for k in keys), sorted(keys)[:5]
    else:  # the whole U-Net; the U-Net takes SDXL's pooled embedding and size ids
        assert any(k.startswith("unet.add_embedding.") for k in keys)
    assert (tmp_path / "samples" / "step_0000002.png").is_file()  # the SDXL pipeline drew


def test_sdxl_pretrains_a_fresh_unet_of_its_shape(tiny_sdxl: Path, shards: str, tmp_path: Path):
    """model.unet_config: a U-Net of SDXL's shape from its config.json, fresh weights, trains
    against the folder's two text encoders and VAE."""
    from safetensors.torch import load_file

    from sdtrain.artifacts.checkpoint import run_info

    config = tiny_sdxl / "unet" / "config.json"
    fresh = f"model.unet_config={config}"
    ckpt = sdxl_run(tmp_path, tiny_sdxl, shards, "experiment=sdxl_finetune", fresh)
    unet = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items()}
    pretrained = load_file(tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.keys() == pretrained.keys()  # SDXL's shape: add_embedding for the text_time ids
    # two steps at lr <= 1e-6 move a weight by ~1e-6: a difference this large is a fresh U-Net
    assert (unet["conv_in.weight"] - pretrained["conv_in.weight"]).abs().max() > 1e-2
    assert run_info(ckpt)["unet_config"]["addition_embed_type"] == "text_time"
