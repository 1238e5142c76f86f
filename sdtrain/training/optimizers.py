"""The optimizer named by `model.optimizer._target_`, finished here; and the schedule-free modes.

Any optimizer class that takes `params` and keyword arguments serves: torch's AdamW (the default),
`prodigyopt.Prodigy`, `schedulefree.AdamWScheduleFree`, `bitsandbytes.optim.AdamW8bit`, ...
(README "Memory savers and other optimizers"). The config's AdamW keys are the usual ones, and a
key left null that the chosen class does not take (AdamW's `fused`) is left out, so swapping the
`_target_` is enough.

Schedule-free optimizers (Defazio et al. 2024) train at one point of their iterates (y) and hold
the weights to evaluate at another (x): `optimizer.train()` moves the parameters to y and
`optimizer.eval()` to x. The module keeps such an optimizer in eval mode between optimizer
steps (`eval_mode` after each step, `train_mode` before each micro-batch), so everything that
runs between steps (the EMA update, sampling, validation, checkpoints and so exports and resumes)
sees x, and a resumed run switches back exactly as an uninterrupted one does. The cost: two
passes over the weights per step (each a lerp toward the optimizer's z).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch


def build(factory: Callable[..., torch.optim.Optimizer], params: Any) -> torch.optim.Optimizer:
    """`factory(params=params)`: Hydra's partial of `model.optimizer`, less the keyword arguments
    set to None that its class does not take. Any other unknown argument is refused by name."""
    keywords = dict(getattr(factory, "keywords", {}))
    target = getattr(factory, "func", factory)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return factory(params=params)
    accepted = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return factory(params=params)
    unknown = sorted(k for k, v in keywords.items() if k not in accepted and v is not None)
    if unknown:
        name = f"{target.__module__}.{target.__qualname__}"
        raise TypeError(
            f"model.optimizer: {name} takes no {', '.join(unknown)} "
            f"(remove with ~model.optimizer.{unknown[0]})"
        )
    kept = {k: v for k, v in keywords.items() if k in accepted}
    return target(*getattr(factory, "args", ()), params=params, **kept)


def has_modes(optimizer: Any) -> bool:
    """Whether the optimizer has train and eval modes (a schedule-free one)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # under Lightning's wrapper
    return callable(getattr(optimizer, "train", None)) and callable(
        getattr(optimizer, "eval", None)
    )


def train_mode(optimizers: Iterable[Any]) -> None:
    """Parameters at the point gradients are taken at (schedule-free's y); others: nothing."""
    for opt in optimizers:
        if has_modes(opt):
            getattr(opt, "optimizer", opt).train()


def eval_mode(optimizers: Iterable[Any]) -> None:
    """Parameters at the point to evaluate, sample and save (schedule-free's x); others: nothing."""
    for opt in optimizers:
        if has_modes(opt):
            getattr(opt, "optimizer", opt).eval()


def step_size(group: dict[str, Any]) -> float:
    """The learning rate a param group's step uses: `lr`, times Prodigy's (and D-Adaptation's)
    estimated distance `d` where the optimizer keeps one (its `lr` is then a multiplier, ~1.0)."""
    return float(group["lr"]) * float(group.get("d", 1.0))
