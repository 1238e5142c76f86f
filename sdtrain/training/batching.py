"""The global batch: per-device batch, gradient accumulation and learning rate derived from it.

`data.global_batch_size=G` (null: `data.batch_size` is per device, as given) splits G samples per
optimizer step over the world of W processes: each takes G / W, as the largest per-device batch
that divides G / W and fits `data.max_batch_size_per_device` (null: `data.batch_size`), times
the gradient accumulation that makes up the rest. G = 16 gives (per device, accumulation) (16, 1)
on 1 process with a cap of 16, (8, 1) on 2, and (4, 2) on 2 with a cap of 4. A G that W does not
divide is refused, naming the nearest sizes it does. So is a G / W above the cap whose largest
divisor that fits is under half the cap, or 1 (with a cap above 1): G = 14 on 2 processes with a
cap of 4 leaves 7 per process, prime, which only 1 per device x 7 accumulation steps would make
up; the error names the nearest sizes that split well (12: 3 x 2, 16: 4 x 2). Every micro-batch
has the same size: no uneven split.

The learning rates stay `model.optimizer.lr` and `model.text_encoder_lr` unless `model.lr_scaling`
says how they follow the global batch from `model.base_batch_size` (the batch they were tuned at):
`linear` (lr x G / base, the rule of thumb for SGD-like steps) or `sqrt` (lr x sqrt(G / base),
often better for Adam). Both scale by the same factor; a null `text_encoder_lr` is the (scaled)
optimizer lr anyway.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

# Keys of the `model` config that are read here, not module arguments (train.build_model drops them).
MODEL_KEYS = ("lr_scaling", "base_batch_size")
SCALINGS = {"linear": lambda r: r, "sqrt": math.sqrt}


@dataclass(frozen=True)
class Batching:
    """What one optimizer step takes: `per_device` x `accumulate` samples on each of `world`."""

    global_size: int
    world: int
    per_device: int
    accumulate: int


def split(global_size: int, world: int, cap: int) -> Batching:
    """Per-device batch (the largest divisor of global/world that is <= cap) and accumulation.

    Raises:
        ValueError: `global_size` is not a whole multiple of `world`, a value is below 1, or the
            per-process count does not split well within `cap` (`splits_well`): the error names
            the nearest global sizes below and above that do.
    """
    for key, value in (("global_batch_size", global_size), ("max_batch_size_per_device", cap)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"data.{key}={value!r} must be a whole number >= 1")
    if world < 1:
        raise ValueError(f"trainer.devices x trainer.num_nodes gives {world} processes: need >= 1")
    if global_size % world:
        below, above = global_size - global_size % world, global_size - global_size % world + world
        nearest = f"{below} or {above}" if below else str(above)
        raise ValueError(
            f"data.global_batch_size={global_size} does not split over a world of {world} "
            f"process(es) (trainer.devices x trainer.num_nodes, or the launcher's): use a "
            f"multiple of {world}, e.g. {nearest}"
        )
    per_rank = global_size // world
    per_device = largest_fit(per_rank, cap)
    if not splits_well(per_rank, cap):
        low = smallest_batch(cap)
        below = next(p for p in range(per_rank - 1, 0, -1) if splits_well(p, cap))
        above = next(p for p in itertools.count(per_rank + 1) if splits_well(p, cap))
        choices = " or ".join(
            f"{p * world} ({largest_fit(p, cap)} per device x {p // largest_fit(p, cap)} "
            "accumulation step(s))"
            for p in (below, above)
        )
        raise ValueError(
            f"data.global_batch_size={global_size} gives {per_rank} samples per process over "
            f"{world} process(es), and no per-device batch from {low} to "
            f"data.max_batch_size_per_device={cap} divides {per_rank}: it would train "
            f"{per_device} per device x {per_rank // per_device} accumulation steps. Use "
            f"data.global_batch_size={choices}, or another data.max_batch_size_per_device"
        )
    return Batching(global_size, world, per_device, per_rank // per_device)


def largest_fit(per_rank: int, cap: int) -> int:
    """The largest per-device batch that divides `per_rank` and is at most `cap`."""
    return max(d for d in range(1, min(cap, per_rank) + 1) if per_rank % d == 0)


def smallest_batch(cap: int) -> int:
    """The smallest per-device batch accepted when accumulation is needed: half of `cap`
    (rounded up), and never 1 unless `cap` is 1."""
    return 1 if cap == 1 else max(2, -(-cap // 2))


def splits_well(per_rank: int, cap: int) -> bool:
    """`per_rank` samples fit one micro-batch, or split into equal ones of `smallest_batch` or more."""
    return per_rank <= cap or largest_fit(per_rank, cap) >= smallest_batch(cap)


def device_count(devices: Any, accelerator: str) -> int:
    """Processes per node for Lightning's `devices` on `accelerator`, resolved as Lightning does:
    a list or "0,1" counts its entries; "auto" or -1 is every visible GPU (1 on a CPU)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text in ("auto", "-1"):
        import torch

        if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1
    return int(text)


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes in the run: the launcher's count under SLURM (`srun`: SLURM_NTASKS, as Lightning's
    SLURMEnvironment reads it) or torchrun (WORLD_SIZE), else devices x num_nodes of the config."""
    interactive = os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive")  # not srun's
    if "SLURM_NTASKS" in os.environ and not interactive:
        return int(os.environ["SLURM_NTASKS"])
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    devices = device_count(
        trainer_cfg.get("devices", 1), str(trainer_cfg.get("accelerator") or "auto")
    )
    return devices * int(trainer_cfg.get("num_nodes") or 1)


def scaled_lr(lr: float, global_size: int, rule: str | None, base: int | None) -> float:
    """`lr` scaled from `base` to `global_size` by `rule` (None: as given)."""
    if rule is None:
        return lr
    if rule not in SCALINGS:
        raise ValueError(f"model.lr_scaling={rule!r}: use one of {', '.join(SCALINGS)} or null")
    if not isinstance(base, int) or isinstance(base, bool) or base < 1:
        raise ValueError(
            f"model.lr_scaling={rule} needs model.base_batch_size (the global batch "
            f"model.optimizer.lr was tuned at) as a whole number >= 1, not {base!r}"
        )
    return lr * SCALINGS[rule](global_size / base)


def apply(cfg: DictConfig) -> Batching | None:
    """Set `data.batch_size`, `trainer.accumulate_grad_batches`, `model.optimizer.lr` and a given
    `model.text_encoder_lr` in `cfg` from the global batch and the LR rule, logging what was
    derived; None (and `cfg` as it was) when neither `data.global_batch_size` nor
    `model.lr_scaling` is set."""
    data, model, trainer = cfg.data, cfg.model, cfg.trainer
    global_size, rule = data.get("global_batch_size"), model.get("lr_scaling")
    if global_size is None and rule is None:
        return None
    world = world_size(trainer)
    if global_size is None:  # scale lr to the batch the config gives
        accumulate = int(trainer.get("accumulate_grad_batches") or 1)
        global_size = int(data.batch_size) * world * accumulate
        batching = Batching(global_size, world, int(data.batch_size), accumulate)
    else:
        cap = data.get("max_batch_size_per_device") or data.batch_size
        batching = split(global_size, world, cap)
        given = trainer.get("accumulate_grad_batches") or 1
        if given not in (1, batching.accumulate):
            log.warning(
                "trainer.accumulate_grad_batches=%s is replaced by %d, derived from "
                "data.global_batch_size=%d",
                given,
                batching.accumulate,
                global_size,
            )
    base = model.get("base_batch_size")
    lr = scaled_lr(float(model.optimizer.lr), global_size, rule, base)
    text_lr = model.get("text_encoder_lr")  # its own lr scales by the same rule
    if text_lr is not None:
        text_lr = scaled_lr(float(text_lr), global_size, rule, base)
    with open_dict(cfg):
        data.batch_size = batching.per_device
        trainer.accumulate_grad_batches = batching.accumulate
        model.optimizer.lr = lr
        if text_lr is not None:
            model.text_encoder_lr = text_lr
    if _rank() == 0:
        how = f"{rule} from model.base_batch_size={model.base_batch_size}" if rule else "as given"
        text = "" if text_lr is None else f", text encoder lr {text_lr:g}"
        log.info(
            "global batch %d = %d process(es) x %d per device x %d accumulation step(s); "
            "lr %g%s (%s)",
            global_size,
            world,
            batching.per_device,
            batching.accumulate,
            lr,
            text,
            how,
        )
    return batching


def _rank() -> int:
    """This process's global rank from its launcher's environment (0 before any launch)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0
