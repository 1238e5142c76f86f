"""Checks of the composed config before anything loads: keys a class does not take, `_target_`s
that do not import (an old module path names its new one), required keys left unset, a GPU
asked for on a machine without one, a resolution the bucket step does not divide, and a
suggestion for a key Hydra refuses."""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Iterator
from importlib import resources
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sdtrain.training import batching

log = logging.getLogger(__name__)


def missing_keys(cfg: DictConfig) -> list[str]:
    """Dotted names of the `???` values in `cfg` (Hydra's own section left out)."""

    def walk(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [m for k, v in node.items() for m in walk(v, f"{prefix}{k}.")]
        if isinstance(node, list):  # data.sources.0.shards: as a Hydra override names it
            return [m for i, v in enumerate(node) for m in walk(v, f"{prefix}{i}.")]
        return [prefix[:-1]] if node == "???" else []

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return sorted(walk(plain, ""))


LOADER_INPUTS = (
    "pretrained",
    "single_file_config",
    "unet_config",
    "prediction_type",
    "zero_terminal_snr",
    "lora",
    "textual_inversion",
    *batching.MODEL_KEYS,
)


def unknown_arguments(node: DictConfig, where: str, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a key of a `_target_` node that its class does not take, suggesting the nearest.

    `+trainer.max_step=10` composes (the `+` adds a key), and would only fail inside Lightning.
    """
    target = node.get("_target_")
    if not target:
        return
    try:
        obj = hydra.utils.get_object(target)
    except ImportError as e:  # Hydra's instantiate would hide why: name the key and the cause
        cause = e.__cause__ or e
        raise ValueError(f"{where}._target_={target}: cannot import it: {cause}") from None
    try:
        params = inspect.signature(obj).parameters
    except (ValueError, TypeError):  # instantiate will say what is wrong
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n in params if n != "self"]
    for key in node:
        if key.startswith("_") or key in names or key in ignore:
            continue
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {where}.{close[0]}?" if close else f"it takes {', '.join(names)}"
        raise ValueError(f"{where}.{key}: {target} takes no argument {key!r}; {hint}")


def target_nodes(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """(key, `_target_`) of every node under `node` that names a class or function to build."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str):
            yield where, target
        for key, value in node.items():
            yield from target_nodes(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from target_nodes(value, f"{where}[{i}]")


def check_targets(cfg: DictConfig) -> None:
    """Every `_target_` imports (an old module path names its new one), and every key of every
    class the run builds is one its class takes."""
    for where, target in target_nodes(OmegaConf.to_container(cfg, resolve=False), ""):
        if where.split(".")[0] != "hydra":
            try:
                hydra.utils.get_object(target)
            except ImportError as e:  # Hydra's instantiate would hide why
                raise ValueError(
                    f"{where}._target_={target}: cannot import it: {e.__cause__ or e}"
                ) from None
    unknown_arguments(cfg.trainer, "trainer", ignore=("callbacks", "logger"))
    unknown_arguments(cfg.data, "data")
    unknown_arguments(cfg.model, "model", ignore=LOADER_INPUTS)
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if node:
                unknown_arguments(node, f"{group}.{name}")


def check_device(trainer: DictConfig) -> None:
    """Refuse `trainer.accelerator=gpu` (or cuda, mps) on a machine without one, naming the CPU
    settings: Lightning's own check ("No supported gpu backend found!") comes only as the Trainer
    is built, after the data, the model and W&B have started."""
    name = trainer.get("accelerator")
    if not isinstance(name, str):  # null, or an Accelerator built from config
        return
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    found = {"cuda": CUDAAccelerator.is_available, "mps": MPSAccelerator.is_available}
    needs = {"gpu": ("cuda", "mps"), "cuda": ("cuda",), "mps": ("mps",)}.get(name.lower(), ())
    if needs and not any(found[n]() for n in needs):
        kind = "GPU" if name.lower() == "gpu" else name.upper()
        raise ValueError(
            f"trainer.accelerator={name} but torch finds no {kind} on this machine: to train on "
            "the CPU add trainer.accelerator=cpu trainer.precision=32-true"
        )


def check_bucket_step(data: DictConfig) -> None:
    """`data.buckets=auto` makes every bucket side a multiple of `data.bucket_step`, from
    `data.resolution`: refuse a resolution the step does not divide, naming the nearest pair."""
    size, step = data.get("resolution"), data.get("bucket_step")
    if data.get("buckets") != "auto" or not all(isinstance(v, int) and v > 0 for v in (size, step)):
        return  # other bucket lists, and values the datamodule refuses with their own message
    if size % step == 0:
        return
    lower, upper = size // step * step, (size // step + 1) * step
    near, other = (lower, upper) if lower and size - lower < upper - size else (upper, lower)
    also = f" (or data.resolution={other})" if other else ""
    raise ValueError(
        f"data.resolution={size} is not a multiple of data.bucket_step={step} (data.buckets=auto "
        f"makes every bucket side a multiple of it): use data.resolution={near} "
        f"data.bucket_step={step}{also}"
    )


def plain_overrides(args: list[str]) -> list[Any]:
    """The command line's overrides, parsed by Hydra's grammar ([] if they do not parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(
            [a for a in args if "=" in a and not a.startswith("-")]
        )
    except HydraException:
        return []


def did_you_mean(args: list[str]) -> str | None:
    """ "did you mean trainer.max_steps=10?" for an override whose key the config lacks, or None.

    Hydra refuses `trainer.max_step=10` ("Could not override"); this finds, part by part, the
    closest key of each config node (difflib), composing the config with the group choices only.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = [
        o for o in plain_overrides(args) if not (o.is_add() or o.is_force_add() or o.is_delete())
    ]
    group_names = {p.name for p in resources.files("sdtrain.conf").iterdir() if p.is_dir()}
    groups = [o for o in overrides if o.key_or_group in group_names]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("sdtrain.conf", version_base="1.3"):
            cfg = compose("train", [o.input_line for o in groups], return_hydra_config=True)
    except Exception:  # a bad group choice: Hydra's message lists the options
        return None
    finally:
        GlobalHydra.instance().clear()
    tree = OmegaConf.to_container(cfg, resolve=False)  # unresolved: `${hydra:...}` stays a string
    hints = []
    for o in (o for o in overrides if o not in groups):
        node, found = tree, []
        for part in o.key_or_group.split("."):
            if not isinstance(node, dict):
                break
            if part not in node:
                close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
                if not close:
                    break
                part = close[0]
            node = node[part]
            found.append(part)
        else:
            key = ".".join(found)
            if key != o.key_or_group:
                value = o.input_line.split("=", 1)[1]
                hints.append(f"did you mean {key}={value}?")
    return " ".join(hints) or None
