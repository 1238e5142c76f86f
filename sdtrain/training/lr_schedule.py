"""The LR schedule's horizon: recorded with the scheduler's state and held after it, so a run
with more steps than its schedule (a resume with a larger trainer.max_steps) never turns back up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdtrain.artifacts import checkpoint


def hold_after_horizon(scheduler: Any, factory: Any) -> int | None:
    """The horizon (`num_training_steps`) `factory` built `scheduler` with, recorded in the
    scheduler's state (`checkpoint.LR_HORIZON`, saved in `lr_schedulers`) and held: past it the LR
    stays at the schedule's value at the horizon, its final value. diffusers' linear, polynomial
    and cosine_with_restarts schedules do that already (0, or lr_end); its cosine is periodic and
    turns back up (half the peak at 1.5 x the horizon, the peak at 2 x), which a run with more
    steps than its schedule (a resume with a larger trainer.max_steps) must not do. None, and the
    scheduler as built, when it is no LambdaLR or has no horizon of at least 1 step."""
    keywords = getattr(factory, "keywords", None) or {}
    horizon = keywords.get("num_training_steps")
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        return None
    scheduler.lr_lambdas = [_held(f, horizon) for f in scheduler.lr_lambdas]
    setattr(scheduler, checkpoint.LR_HORIZON, horizon)
    return horizon


def _held(lr_lambda: Callable[[int], float], horizon: int) -> Callable[[int], float]:
    """`lr_lambda` held at its value at `horizon` after it. A closure, as diffusers' are: the
    scheduler's state saves it as None, not as pickled code."""

    def held(step: int) -> float:
        return lr_lambda(min(step, horizon))

    return held
