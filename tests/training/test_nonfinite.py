"""Non-finite steps (sdtrain/training/nonfinite.py) in a real Trainer: skipped together, EMA untouched,
too many in a row stop the run with finite weights left."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.demo.tiny import build_parts
from sdtrain.training.ema import EMA
from sdtrain.training.module import StableDiffusionModule
from sdtrain.training.nonfinite import NonFiniteGuard, NonFiniteStepError


class Poisoned(StableDiffusionModule):
    """Its loss is NaN (or inf) at the optimizer steps in `poison` (1-based), as after a bad batch."""

    def __init__(self, poison: set[int], value: float, **kw) -> None:
        super().__init__(build_parts(32), **kw)
        self.poison, self.value = poison, value
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.value if self.global_step + 1 in self.poison else loss

    def on_train_batch_end(self, *args) -> None:
        self.after_step[self.global_step] = {
            k: v.detach().clone() for k, v in self.unet.state_dict().items()
        }


def fit(
    module: StableDiffusionModule, shards: str, tiny_model: Path, steps: int, precision="32-true"
) -> L.Trainer:
    dm = WebDataModule(shards, str(tiny_model), resolution=32, batch_size=2, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_poisoned_step_is_skipped_and_training_goes_on(value, shards: str, tiny_model: Path):
    m = Poisoned({3}, value, optimizer=partial(torch.optim.AdamW, lr=1e-3), ema=EMA(decay=0.9))
    trainer = fit(m, shards, tiny_model, steps=5)
    assert trainer.global_step == 5 and m.nonfinite.total == 1
    assert finite(m.unet.parameters()) and finite(m.ema.shadow.values())
    assert m.ema.num_updates == 4  # not at the skipped step
    opt_state = trainer.optimizers[0].state
    assert {int(s["step"]) for s in opt_state.values()} == {4}  # Adam's moments untouched too
    before, skipped = m.after_step[2], m.after_step[3]
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # the weights did not move
    assert not all(torch.equal(before[k], m.after_step[4][k]) for k in before)  # then they do


def test_too_many_in_a_row_stop_the_run_with_finite_weights(shards: str, tiny_model: Path):
    m = Poisoned(
        set(range(2, 100)),
        float("nan"),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        ema=EMA(decay=0.9),
        max_nonfinite_in_a_row=3,
    )
    with pytest.raises(NonFiniteStepError, match=r"3 optimizer steps in a row \(to step 4\)"):
        fit(m, shards, tiny_model, steps=10)
    assert finite(m.unet.parameters()) and finite(m.ema.shadow.values())
    assert m.ema.num_updates == 1


def test_another_ranks_bad_step_is_skipped_here_too():
    """The flag is summed over ranks: finite local gradients are dropped when another rank's
    were not (FSDP shards gradients, so ranks can disagree before the sum)."""
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    guard = NonFiniteGuard(5)
    assert guard.check([p], 1, reduce_sum=lambda t: t + 1) and p.grad is None
    p.grad = torch.ones(3)
    assert not guard.check([p], 2, reduce_sum=lambda t: t) and p.grad is not None
    assert guard.total == 1 and guard.in_a_row == 0
    with pytest.raises(ValueError, match="max_nonfinite_in_a_row=0"):
        NonFiniteGuard(0)


def test_fused_optimizer_skips_a_poisoned_step_on_the_device(shards: str, tiny_model: Path):
    """Fused AdamW takes the flag as its found_inf: no host sync a step, the same skip."""
    opt = partial(torch.optim.AdamW, lr=1e-3, fused=True)
    m = Poisoned({3}, float("nan"), optimizer=opt, ema=EMA(decay=0.9))
    shadows = {}
    m.ema.update = _recording(m.ema.update, m.ema, shadows)
    trainer = fit(m, shards, tiny_model, steps=5)
    assert trainer.global_step == 5 and m.nonfinite.total == 1  # read back at the end
    assert m.nonfinite._pending is not None  # the device path ran
    assert finite(m.unet.parameters()) and finite(m.ema.shadow.values())
    opt_state = trainer.optimizers[0].state
    assert {int(s["step"]) for s in opt_state.values()} == {4}  # the skipped step not counted
    before, skipped = m.after_step[2], m.after_step[3]
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # the weights did not move
    assert all(torch.equal(shadows[2][k], shadows[3][k]) for k in shadows[2])  # nor the EMA
    assert not all(torch.equal(shadows[3][k], shadows[4][k]) for k in shadows[3])  # then it does


def _recording(update, ema, shadows):
    def wrapped(params, step, keep=None):
        update(params, step, keep)
        shadows[step] = {k: v.clone() for k, v in ema.shadow.items()}

    return wrapped


def test_fused_optimizer_stops_the_run_at_the_logging_window(shards: str, tiny_model: Path):
    m = Poisoned(
        set(range(2, 100)),
        float("nan"),
        optimizer=partial(torch.optim.AdamW, lr=1e-3, fused=True),
        ema=EMA(decay=0.9),
        max_nonfinite_in_a_row=3,
    )
    dm = WebDataModule(shards, str(tiny_model), resolution=32, batch_size=2, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        log_every_n_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(NonFiniteStepError, match=r"3 optimizer steps in a row \(to step 4\)"):
        trainer.fit(m, datamodule=dm)
    assert finite(m.unet.parameters()) and finite(m.ema.shadow.values())
    assert m.nonfinite.total == 3


@pytest.mark.parametrize("fused,precision", [(True, "bf16-mixed"), (False, "32-true")])
def test_clipping_reuses_the_checks_norm(fused, precision, shards, tiny_model, monkeypatch):
    """The gradients are read for their norm once a step (the non-finite check's norm serves the
    clipping), and the weights come out bit for bit as with clip_grad_norm_ (which reads them
    again)."""
    import sdtrain.training.optimizer_hooks

    norms = []
    foreach_norm = torch._foreach_norm
    monkeypatch.setattr(
        torch, "_foreach_norm", lambda *a, **k: norms.append(1) or foreach_norm(*a, **k)
    )

    def run() -> dict[str, torch.Tensor]:
        norms.clear()
        torch.manual_seed(0)
        m = Poisoned(set(), 1.0, optimizer=partial(torch.optim.AdamW, lr=1e-2, fused=fused))
        fit(m, shards, tiny_model, steps=3, precision=precision)
        return m.unet.state_dict()

    reused = run()
    assert len(norms) == 3
    monkeypatch.setattr(
        sdtrain.training.optimizer_hooks,  # where the optimizer step calls it
        "clip_with_norm",
        lambda ps, v, _: torch.nn.utils.clip_grad_norm_(ps, v),
    )
    again = run()
    assert len(norms) == 6  # the check's and clip_grad_norm_'s own
    assert all(torch.equal(reused[k], again[k]) for k in reused)
