"""Optimizers chosen with model.optimizer._target_: Prodigy, schedule-free AdamW and 8-bit AdamW
(bitsandbytes) train the tiny model, checkpoint (weights_only) and resume bit for bit; the
schedule-free one is in eval mode between steps (what sampling, validation and checkpoints see)
and in train mode for each step."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from sdtrain.artifacts import checkpoint
from sdtrain.cli.train import build_model
from sdtrain.demo.tiny import build_parts
from sdtrain.training import optimizers
from sdtrain.training.ema import EMA
from sdtrain.training.module import StableDiffusionModule
from tests.conftest import compose_cfg, tiny_overrides
from tests.training.fitting import fit

prodigyopt = pytest.importorskip("prodigyopt", reason='pip install -e ".[optimizers]"')
schedulefree = pytest.importorskip("schedulefree", reason='pip install -e ".[optimizers]"')
bnb = pytest.importorskip("bitsandbytes", reason='pip install -e ".[optimizers]"')

# the config's AdamW keys (conf/model/finetune.yaml) with another _target_, as an override makes them
ADAMW_KEYS = dict(betas=[0.9, 0.999], weight_decay=1e-2, eps=1e-8, fused=None)
FACTORIES = {
    "prodigy": partial(prodigyopt.Prodigy, lr=1.0, **ADAMW_KEYS, use_bias_correction=True),
    "schedulefree": partial(schedulefree.AdamWScheduleFree, lr=3e-3, **ADAMW_KEYS),
    "adamw8bit": partial(bnb.optim.AdamW8bit, lr=3e-3, **ADAMW_KEYS),
}
TARGETS = {
    "prodigy": "prodigyopt.Prodigy",
    "schedulefree": "schedulefree.AdamWScheduleFree",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
}


def module(factory) -> StableDiffusionModule:
    return StableDiffusionModule(
        build_parts(32, seed=0), optimizer=factory, ema=EMA(decay=0.9, device="cpu")
    )


def test_null_keys_an_optimizer_does_not_take_are_left_out_and_others_refused():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(optimizers.build(FACTORIES["prodigy"], params), prodigyopt.Prodigy)
    adamw = optimizers.build(partial(torch.optim.AdamW, lr=1e-3, fused=None), params)
    assert adamw.defaults["fused"] is None  # AdamW takes `fused`: passed on as given
    with pytest.raises(TypeError, match=r"Prodigy takes no fused \(remove with ~model"):
        optimizers.build(partial(prodigyopt.Prodigy, lr=1.0, fused=True), params)


@pytest.mark.parametrize("name", list(TARGETS))
def test_selected_by_target_in_the_config(name: str, tiny_model: Path, shards: str, tmp_path):
    """model.optimizer._target_=... alone (the AdamW keys left as they are) builds that optimizer."""
    overrides = tiny_overrides(tiny_model, shards) + [f"model.optimizer._target_={TARGETS[name]}"]
    cfg = compose_cfg(tmp_path, overrides)
    opt = build_model(cfg.model).configure_optimizers()["optimizer"]
    assert type(opt).__module__.split(".")[0] == TARGETS[name].split(".")[0]


class Modes(L.Callback):
    """The schedule-free optimizer's mode at each backward and after each step."""

    def __init__(self) -> None:
        self.at_backward: list[bool] = []
        self.between_steps: list[bool] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.at_backward.append(trainer.optimizers[0].param_groups[0].get("train_mode"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.between_steps.append(trainer.optimizers[0].param_groups[0].get("train_mode"))
        with pl_module.ema_weights() as swapped:  # as sampling does
            assert swapped


def same(a, b) -> bool:
    """Equal nested state (tensors bit for bit)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", list(FACTORIES))
def test_trains_checkpoints_and_resumes_exactly(
    name: str, shards: str, tiny_model: Path, tmp_path: Path
):
    """6 real steps; a run resumed from the step-3 checkpoint (read weights_only, as sdtrain-export
    and a resume read it) ends with the same weights, EMA and optimizer state, bit for bit."""
    start = {k: p.detach().clone() for k, p in module(FACTORIES[name]).trainable_parameters()}
    modes = Modes()
    run = module(FACTORIES[name])
    trainer = fit(run, shards, tiny_model, 6, tmp_path / "run", callbacks=[modes])
    weights = {k: p.detach().clone() for k, p in run.trainable_parameters()}
    assert all(not torch.equal(weights[k], start[k]) for k in start if start[k].numel() > 1000)
    saved = checkpoint.load(tmp_path / "run" / "epoch=0-step=3.ckpt")  # weights_only=True
    assert saved["global_step"] == 3 and saved["optimizer_states"]

    resumed = module(FACTORIES[name])
    again = fit(
        resumed, shards, tiny_model, 6, tmp_path / "re", tmp_path / "run" / "epoch=0-step=3.ckpt"
    )
    assert all(torch.equal(p, weights[k]) for k, p in resumed.trainable_parameters())
    assert all(torch.equal(resumed.ema.shadow[k], v) for k, v in run.ema.shadow.items())
    a, b = trainer.optimizers[0].state_dict(), again.optimizers[0].state_dict()
    assert same(a, b)  # moments, step counts, Prodigy's d, schedule-free's z and weight sums

    group = trainer.optimizers[0].param_groups[0]
    if name == "prodigy":  # the distance estimate grew from d0; train/lr logs lr x d
        assert group["d"] > group["d0"] and optimizers.step_size(group) == group["lr"] * group["d"]
    if name == "schedulefree":
        assert modes.at_backward == [True] * 6 and modes.between_steps == [False] * 6
        assert saved["optimizer_states"][0]["param_groups"][0]["train_mode"] is False
        opt = trainer.optimizers[0]
        opt.train()  # the training point y differs from the weights saved and sampled (x)
        assert any(not torch.equal(p, weights[k]) for k, p in run.trainable_parameters())
    if name == "adamw8bit":  # 1 byte per state value past min_8bit_size (4096), AdamW's 4
        big = [p for _, p in run.trainable_parameters() if p.numel() >= 4096]
        states = [trainer.optimizers[0].state[p] for p in big]
        assert big and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in states)
