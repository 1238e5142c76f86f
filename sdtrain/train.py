"""Train a Stable Diffusion U-Net. With no arguments: the built-in demo, on whatever device exists.

Single device:     sdtrain-train                       (or python -m sdtrain.train)
Your data/model:   sdtrain-train model.pretrained=/models/sd15 "data.train_shards='/data/{00000..00999}.tar'"
GPUs on one node:  sdtrain-train trainer=gpu trainer.devices=8 trainer.strategy=ddp
torchrun:          torchrun --nproc_per_node 8 -m sdtrain.train trainer=gpu trainer.devices=8 trainer.strategy=ddp
SLURM:             sbatch scripts/slurm.sh  (srun sdtrain-train trainer.num_nodes=N ...)
Resume:            sdtrain-train hydra.run.dir=<previous run folder> ckpt_path=last
Sweep:             sdtrain-train -m model.optimizer.lr=1e-4,3e-4
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from sdtrain import checkpoint, preemption, speed
from sdtrain.models import check_model_folder, check_resolution
from sdtrain.resolvers import register

log = logging.getLogger(__name__)
register()
# The frozen VAE and text encoder stay in eval mode on purpose (StableDiffusionModule.train).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")


def instantiate_map(group: DictConfig | None) -> list[Any]:
    """Build every `_target_` entry of a config map (callbacks, loggers); None builds nothing."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c and "_target_" in c]


def missing_keys(cfg: DictConfig) -> list[str]:
    """Dotted names of the `???` values in `cfg` (Hydra's own section left out)."""

    def walk(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [m for k, v in node.items() for m in walk(v, f"{prefix}{k}.")]
        return [prefix[:-1]] if node == "???" else []

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return sorted(walk(plain, ""))


def checkpoint_file(cfg: DictConfig) -> Path | None:
    """The file `ckpt_path` names; "last" is last.ckpt in the checkpoint folder of this run."""
    path = cfg.get("ckpt_path")
    if path is None:
        return None
    if path == "last":
        dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
        path = Path(dirpath or Path(cfg.paths.output_dir) / "checkpoints") / "last.ckpt"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: {path} is not a file")
    return path


def resume_wandb_run(cfg: DictConfig, ckpt: Path | None) -> None:
    """Point the W&B logger at the run the checkpoint was logging to, so the curves continue."""
    if ckpt is None or not OmegaConf.select(cfg, "logger.wandb"):
        return
    run_id = checkpoint.run_info(checkpoint.load(ckpt))["wandb_run_id"]
    if run_id and not cfg.logger.wandb.get("id"):
        with open_dict(cfg):
            cfg.logger.wandb.id = run_id
            cfg.logger.wandb.resume = "allow"


# Keys of the `model` config that feed the loader (`model.parts` interpolates them) rather than
# the module: users set `model.pretrained=...`, the module receives the parts built from it.
LOADER_INPUTS = ("pretrained", "unet_config", "prediction_type")


def build_model(model_cfg: DictConfig) -> L.LightningModule:
    """The module from `model`: its `parts` node (a loader) runs first and hands it the parts."""
    # resolved to plain containers: only plain lists and dicts, never OmegaConf objects, reach the
    # hyperparameters a checkpoint stores, so it loads with torch.load(weights_only=True).
    node = OmegaConf.to_container(model_cfg, resolve=True)
    for key in LOADER_INPUTS:
        node.pop(key, None)
    return hydra.utils.instantiate(node, _convert_="all")


def train(cfg: DictConfig) -> float | None:
    """Build datamodule, module, callbacks, loggers and trainer from `cfg`, fit, return the metric."""
    missing = missing_keys(cfg)
    if missing:
        raise ValueError(
            f"these config keys need a value: {', '.join(missing)} (set them on the command line, "
            "e.g. model.pretrained=/models/sd15 \"data.train_shards='/data/{00000..00099}.tar'\" or a shard folder)"
        )
    L.seed_everything(cfg.seed, workers=True)
    speed.set_float32_matmul_precision(cfg.get("float32_matmul_precision"))
    ckpt = checkpoint_file(cfg)
    resume_wandb_run(cfg, ckpt)
    try:
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    except InstantiationException as e:  # show the datamodule's own message, naming key and value
        if isinstance(e.__cause__, (ValueError, FileNotFoundError)):
            raise e.__cause__ from None
        raise
    if getattr(datamodule, "latent_cache_info", None) is None:  # a cache was checked when made
        check_model_folder(cfg.model.pretrained, need_unet=not cfg.model.get("unet_config"))
        check_resolution(cfg.model.pretrained, OmegaConf.select(cfg, "data.resolution"))
    model = build_model(cfg.model)
    callbacks = instantiate_map(cfg.get("callbacks"))
    loggers = instantiate_map(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        with preemption.usr1_stops_like_sigterm():
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except SIGTERMException:  # SIGTERM or SIGUSR1: checkpoint saved at the step reached
        if trainer.is_global_zero:
            log.warning(
                "stopped by a signal at step %d; resume with: sdtrain-train "
                "hydra.run.dir=%s ckpt_path=last (and the run's overrides)",
                trainer.global_step,
                cfg.paths.output_dir,
            )
        return None
    finally:
        finish_wandb()
    if trainer.is_global_zero:
        log.info("run folder: %s (checkpoints/, samples/, wandb/)", cfg.paths.output_dir)
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric") or "train/loss")
    return None if metric is None else float(metric)


def finish_wandb() -> None:
    """Close this process's W&B run, flushing it to disk, so the next train() starts a new one."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


@hydra.main(version_base="1.3", config_path="pkg://sdtrain.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
