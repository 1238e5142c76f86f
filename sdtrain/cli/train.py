"""Train a Stable Diffusion U-Net. With no arguments: the built-in demo, on whatever device exists.

Single device:     sdtrain-train                       (or python -m sdtrain.train)
Your data/model:   sdtrain-train model.pretrained=/models/sd15 "data.train_shards='/data/{00000..00999}.tar'"
GPUs on one node:  sdtrain-train trainer=gpu trainer.devices=8 trainer.strategy=ddp
torchrun:          torchrun --nproc_per_node 8 -m sdtrain.train trainer=gpu trainer.devices=8 trainer.strategy=ddp
SLURM:             sbatch scripts/slurm.sh  (srun sdtrain-train trainer.num_nodes=N ...)
Resume:            sdtrain-train hydra.run.dir=<previous run folder> ckpt_path=last
Sweep:             sdtrain-train -m model.optimizer.lr=1e-4,3e-4
Print the config:  sdtrain-train --cfg job
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from sdtrain.artifacts import checkpoint
from sdtrain.artifacts.checkpoint_io import put_back
from sdtrain.artifacts.class_images import fill_class_shards
from sdtrain.callbacks.progress_bar import with_step_bar
from sdtrain.callbacks.progress_log import ProgressLog, run_folder_line
from sdtrain.callbacks.stop import GroupStop
from sdtrain.cli import resume
from sdtrain.cli.config_checks import (
    LOADER_INPUTS,
    check_bucket_step,
    check_device,
    check_targets,
    did_you_mean,
    missing_keys,
)
from sdtrain.demo.resolvers import check_demo_data, register
from sdtrain.models import speed
from sdtrain.models.loader import check_model_folder
from sdtrain.models.parts import check_resolution
from sdtrain.models.single_file import check_config_folder, is_single_file
from sdtrain.runtime import quiet, run_folder, watchdog
from sdtrain.training import batching
from sdtrain.training.validation import check_optimized_metric, in_sweep, optimized_value

log = logging.getLogger(__name__)
register()


def instantiate_map(group: DictConfig | None) -> list[Any]:
    """Build every `_target_` entry of a config map (callbacks, loggers); None builds nothing."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c and "_target_" in c]


def checkpoint_file(cfg: DictConfig) -> Path | None:
    """The file `ckpt_path` names; "last" is last.ckpt in the checkpoint folder of this run."""
    path = cfg.get("ckpt_path")
    if path is None:
        return None
    if path == "last":
        dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
        path = Path(dirpath or Path(cfg.paths.output_dir) / "checkpoints") / "last.ckpt"
    path = Path(path)
    put_back(path)  # a sharded save killed mid-swap left the checkpoint beside its name
    if not path.is_file() and not checkpoint.is_sharded(path):
        raise FileNotFoundError(resume.no_checkpoint(cfg, path))
    return path


def resume_wandb_run(cfg: DictConfig, saved: dict[str, Any]) -> None:
    """Point the W&B logger at the run the checkpoint `saved` was logging to, so curves continue."""
    if not OmegaConf.select(cfg, "logger.wandb"):
        return
    run_id = checkpoint.run_info(saved)["wandb_run_id"]
    if run_id and not cfg.logger.wandb.get("id"):
        with open_dict(cfg):
            cfg.logger.wandb.id = run_id
            cfg.logger.wandb.resume = "allow"


# diffusers schedules whose LR does not depend on num_training_steps: nothing to keep or say
HORIZON_FREE = ("constant", "constant_with_warmup", "piecewise_constant")


def keep_lr_horizon(cfg: DictConfig, ckpt: Path, saved: dict[str, Any]) -> None:
    """A resumed run continues the LR schedule it had: `model.lr_scheduler.num_training_steps`
    (by default `${trainer.max_steps}`) becomes the horizon the checkpoint recorded, whatever
    `trainer.max_steps` is now, and a log line says so when they differ. Past the horizon the LR
    stays at its final value (`sdtrain.training.lr_schedule.hold_after_horizon`). A horizon set
    explicitly on the resume (not through trainer.max_steps) replaces the recorded one, with a
    warning: the LR moves to that schedule's value at the step reached."""
    sched = cfg.model.get("lr_scheduler")
    if not sched or "num_training_steps" not in sched or sched.get("name") in HORIZON_FREE:
        return
    recorded, now = checkpoint.lr_horizon(saved), sched.num_training_steps
    step = int(saved.get("global_step", 0))
    if recorded is None:
        log.warning(
            "%s records no LR schedule horizon (written by an older sdtrain): the %s schedule is "
            "rebuilt with num_training_steps=%s; if the run that wrote it had another "
            "trainer.max_steps, pass model.lr_scheduler.num_training_steps=<that> to go on "
            "with its schedule",
            ckpt,
            sched.get("name"),
            now,
        )
        return
    if now == recorded:
        return
    if not OmegaConf.is_interpolation(sched, "num_training_steps"):  # set on purpose
        log.warning(
            "model.lr_scheduler.num_training_steps=%s replaces the horizon of %d steps that %s "
            "recorded: from step %d the LR follows the new schedule (it jumps to that schedule's "
            "value there)",
            now,
            recorded,
            ckpt,
            step,
        )
        return
    sched.num_training_steps = recorded
    log.warning(
        "resuming at step %d with trainer.max_steps=%s: the LR schedule keeps its recorded "
        "horizon of %d steps (%s); after it the LR stays at its final value. To plan a new "
        "schedule, set model.lr_scheduler.num_training_steps explicitly",
        step,
        cfg.trainer.get("max_steps"),
        recorded,
        sched.get("name"),
    )


# Keys of the `model` config that feed the loader (`model.parts` interpolates them) rather than
# the module: users set `model.pretrained=...`, the module receives the parts built from it. The
# LR scaling rule's keys (batching.MODEL_KEYS) are not module arguments either.


def build_model(model_cfg: DictConfig) -> L.LightningModule:
    """The module from `model`: its `parts` node (a loader) runs first and hands it the parts."""
    # resolved to plain containers: only plain lists and dicts, never OmegaConf objects, reach the
    # hyperparameters a checkpoint stores, so it loads with torch.load(weights_only=True).
    node = OmegaConf.to_container(model_cfg, resolve=True)
    for key in LOADER_INPUTS:
        node.pop(key, None)
    return hydra.utils.instantiate(node, _convert_="all")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint `ckpt_path` names, read now: a bad file is named before any model loads."""
    try:
        return checkpoint.load_meta(path)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(
            f"ckpt_path: {e}; resume from a .ckpt that sdtrain-train wrote (ckpt_path=last, or "
            "another file in the run's checkpoints/)"
        ) from None


def check_sharded_resume(cfg: DictConfig, path: Path) -> None:
    """A sharded checkpoint holds FSDP's shards and optimizer layout: only trainer=fsdp resumes it."""
    target = str(OmegaConf.select(cfg, "trainer.strategy._target_", default="") or "")
    if checkpoint.is_sharded(path) and not target.endswith(
        ("FSDPStrategy", "ModelParallelStrategy")
    ):
        raise ValueError(
            f"ckpt_path: {path} is a sharded checkpoint (written by trainer=fsdp with "
            "save_distributed_checkpoint=true): resume it with trainer=fsdp, or export it with "
            "sdtrain-export and start a new run from the export (model.pretrained=...)"
        )


def finished(cfg: DictConfig, ckpt: Path, saved: dict[str, Any]) -> bool:
    """True, with a log line saying how to go on, when the checkpoint is already at max_steps."""
    step, max_steps = int(saved.get("global_step", 0)), cfg.trainer.get("max_steps")
    if max_steps is None or max_steps < 0 or cfg.trainer.get("fast_dev_run") or step < max_steps:
        return False
    log.warning(
        "nothing to train: %s is at step %d and trainer.max_steps=%d, so this run is finished. "
        "To train on, resume with a larger trainer.max_steps, e.g. sdtrain-train hydra.run.dir=%s "
        "ckpt_path=%s trainer.max_steps=%d",
        ckpt,
        step,
        max_steps,
        cfg.paths.output_dir,
        cfg.ckpt_path,
        2 * step,
    )
    return True


@dataclass
class Prepared:
    """What `prepare` checked and built: the datamodule and the checkpoint to resume (or None)."""

    datamodule: L.LightningDataModule
    ckpt: Path | None


def prepare(cfg: DictConfig) -> Prepared | None:
    """Check everything the config names before any model loads, and build the datamodule.

    Every mistake found here (a missing or misspelled key, a bad value, a missing model folder or
    shard, a file that is not a checkpoint) raises ValueError or FileNotFoundError naming it.
    Returns None when the checkpoint to resume is already at `trainer.max_steps`.
    """
    # first: making the demo model and data (on first use) is as quiet as training
    quiet.apply(verbose=bool(cfg.get("verbose")), resuming=cfg.get("ckpt_path") is not None)
    missing = missing_keys(cfg)
    if missing:
        raise ValueError(
            f"these config keys need a value: {', '.join(missing)} (set them on the command line, "
            "e.g. model.pretrained=/models/sd15 \"data.train_shards='/data/{00000..00099}.tar'\" or a shard folder)"
        )
    check_targets(cfg)
    speed.use_cuda_alloc_conf(cfg.get("cuda_alloc_conf"))  # before anything starts CUDA
    check_device(cfg.trainer)  # one line naming the CPU settings, before anything starts
    check_bucket_step(cfg.data)
    check_demo_data(cfg.data)  # your own shards under the demo's flips and size
    batching.apply(cfg)  # data.batch_size, accumulation and lr from the global batch
    ckpt = checkpoint_file(cfg)
    if ckpt is not None:
        check_sharded_resume(cfg, ckpt)
        saved = load_checkpoint(ckpt)
        if finished(cfg, ckpt, saved):
            return None
        resume_wandb_run(cfg, saved)
        keep_lr_horizon(cfg, ckpt, saved)
        del saved  # memory-mapped; Lightning reads the file again in fit
    L.seed_everything(cfg.seed, workers=True)
    speed.set_float32_matmul_precision(cfg.get("float32_matmul_precision"))
    fill_class_shards(cfg.data)  # DreamBooth: the base model draws its class images (once)
    try:
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    except InstantiationException as e:  # show the datamodule's own message, naming key and value
        if isinstance(e.__cause__, (ValueError, FileNotFoundError)):
            raise e.__cause__ from None
        raise
    check_optimized_metric(cfg, datamodule)  # a sweep must rank by a metric the run logs
    if getattr(datamodule, "latent_cache_info", None) is None:  # a cache was checked when made
        check_model_folder(cfg.model.pretrained, need_unet=not cfg.model.get("unet_config"))
        if is_single_file(cfg.model.pretrained):  # its configs and tokenizer come from a folder
            check_config_folder(cfg.model.get("single_file_config"), cfg.model.pretrained)
        check_resolution(cfg.model.pretrained, OmegaConf.select(cfg, "data.resolution"))
    return Prepared(datamodule, ckpt)


def fit(cfg: DictConfig, prepared: Prepared) -> float | None:
    """Build module, callbacks, loggers and trainer, fit, and return the metric."""
    speed.use_compile_cache(OmegaConf.select(cfg, "paths.compile_cache"), cfg.model.get("compile"))
    model = build_model(cfg.model)
    callbacks = [*instantiate_map(cfg.get("callbacks")), GroupStop()]  # signals stop all ranks
    callbacks = with_step_bar(callbacks, cfg.trainer.get("enable_progress_bar"))  # not "Epoch 0/-2"
    loggers = instantiate_map(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    speed.profile_compiled_whole(trainer, cfg.model.get("compile"))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if watchdog.launched_by_a_parent(trainer.local_rank, lightning_child(trainer)):
        watchdog.exit_with_parent()  # rank 0 or torchrun's agent gone: do not wait in a collective
    try:
        trainer.fit(
            model, datamodule=prepared.datamodule, ckpt_path=prepared.ckpt, weights_only=True
        )
    except SIGTERMException:  # SIGTERM, SIGUSR1 or Ctrl-C on any rank: saved at the step reached
        if trainer.is_global_zero:
            log.warning(
                "stopped by a signal at step %d; resume with: sdtrain-train "
                "hydra.run.dir=%s ckpt_path=last",
                trainer.global_step,
                cfg.paths.output_dir,
            )
        return None
    finally:
        finish_wandb()
    if trainer.is_global_zero and not any(isinstance(c, ProgressLog) for c in trainer.callbacks):
        log.info(run_folder_line(trainer))  # else ProgressLog's summary said it
    key = cfg.get("optimized_metric") or "train/loss"
    return optimized_value(trainer.callback_metrics, key, sweep=in_sweep())


def lightning_child(trainer: L.Trainer) -> bool:
    """Whether this process is a rank Lightning's own launcher started (not rank 0)."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return isinstance(launcher, _SubprocessScriptLauncher) and trainer.local_rank > 0


def train(cfg: DictConfig) -> float | None:
    """Check `cfg`, then build datamodule, module, callbacks, loggers and trainer, fit, and return
    the metric a sweeper optimizes (None when there was nothing to train)."""
    prepared = prepare(cfg)
    return None if prepared is None else fit(cfg, prepared)


def finish_wandb() -> None:
    """Close this process's W&B run, flushing it to disk, so the next train() starts a new one."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


@hydra.main(version_base="1.3", config_path="pkg://sdtrain.conf", config_name="train")
def app(cfg: DictConfig) -> float | None:
    """The Hydra app: a mistake `prepare` finds is one line on stderr and exit status 1."""
    if resume.note:  # what a resume reused of its run's overrides, and what it changed
        log.info(resume.note)
    try:
        prepared = prepare(cfg)
    except (ValueError, FileNotFoundError) as e:
        resume.forget_record()  # a resume that never ran leaves no record for the next to read
        sys.exit(f"sdtrain-train: {e}")
    return None if prepared is None else fit(cfg, prepared)


def main() -> None:
    """`sdtrain-train`: the Hydra app; a resume of a run in its folder trains with the run's
    recorded overrides (new ones on top) and keeps its first Hydra record; a suggestion when
    Hydra refuses a key that is not in the config."""
    sys.argv[1:] = resume.resume_args(sys.argv[1:])
    try:
        app()
    except SystemExit as e:
        if e.code not in (None, 0):
            run_folder.discard_unused()  # a config mistake leaves no empty dated run folder
        hint = did_you_mean(sys.argv[1:]) if e.code == 1 else None  # 1: Hydra's own errors
        for line in (hint, resume.note if e.code == 1 else None):  # what Hydra was given
            if line:
                print(line, file=sys.stderr)
        raise
    except BaseException:  # HYDRA_FULL_ERROR=1 re-raises the error itself; Ctrl-C while loading
        run_folder.discard_unused()
        raise


if __name__ == "__main__":
    main()
