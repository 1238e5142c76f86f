"""The LR schedule holds its final value past its horizon, and records the horizon in its state
(issue 26, item 7; the resume that keeps it is in tests/test_resume.py)."""

from __future__ import annotations

import io
from functools import partial

import pytest
import torch
from diffusers.optimization import get_scheduler

from sdtrain.artifacts import checkpoint
from sdtrain.training.lr_schedule import hold_after_horizon


def lrs(sched, opt, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["cosine", "linear", "cosine_with_restarts", "polynomial"])
def test_past_its_horizon_the_lr_stays_at_its_final_value(name: str):
    """diffusers' cosine turns back up past its end (here half the peak 4 steps after it, the
    peak after 8, the length of its decay): held, it stays at 0, as its linear, polynomial and
    cosine_with_restarts do already. Up to the horizon the schedule is diffusers' own."""
    factory = partial(get_scheduler, name, num_warmup_steps=2, num_training_steps=10)
    plain_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    plain = lrs(factory(optimizer=plain_opt), plain_opt, 21)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(optimizer=opt)
    assert hold_after_horizon(sched, factory) == 10
    held = lrs(sched, opt, 21)
    assert held[:11] == plain[:11]
    assert held[11:] == [plain[10]] * 10
    if name == "cosine":
        assert plain[14] == pytest.approx(0.5) and plain[18] == pytest.approx(1.0)


def test_the_horizon_is_saved_with_the_scheduler_and_loads_weights_only():
    factory = partial(get_scheduler, "cosine", num_warmup_steps=1, num_training_steps=4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(optimizer=opt)
    hold_after_horizon(sched, factory)
    buffer = io.BytesIO()
    torch.save({"lr_schedulers": [sched.state_dict()]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["lr_schedulers"][0]["lr_lambdas"] == [None]  # no code pickled
    assert checkpoint.lr_horizon(saved) == 4
    assert checkpoint.lr_horizon({"lr_schedulers": [{"last_epoch": 3}]}) is None  # before it
    assert checkpoint.lr_horizon({}) is None  # weights only


@pytest.mark.parametrize("horizon", [-1, 0, None])
def test_no_horizon_leaves_the_schedule_as_built(horizon):
    """trainer.max_steps=-1 (epochs decide) gives no horizon to hold or keep."""
    factory = partial(get_scheduler, "constant", num_warmup_steps=0, num_training_steps=horizon)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(optimizer=opt)
    lambdas = list(sched.lr_lambdas)
    assert hold_after_horizon(sched, factory) is None
    assert sched.lr_lambdas == lambdas and checkpoint.LR_HORIZON not in sched.state_dict()
