"""The LightningModule on the tiny model: loss, frozen parts, overfitting one batch."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from sdtrain import diffusion
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.module import StableDiffusionModule


@pytest.fixture(scope="module")
def batch(shards: str, tiny_model: Path) -> dict:
    dm = WebDataModule(shards, str(tiny_model), resolution=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def make(tiny_model: Path, **kw) -> StableDiffusionModule:
    return StableDiffusionModule(
        str(tiny_model), optimizer=partial(torch.optim.AdamW, lr=3e-3), **kw
    )


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "prediction_type": "epsilon",
            "min_snr_gamma": 5.0,
            "noise_offset": 0.1,
            "caption_dropout": 1.0,
        },
    ],
)
def test_training_step_finite_and_only_unet_learns(tiny_model: Path, batch: dict, kw: dict):
    m = make(tiny_model, **kw)
    m.train()
    assert not m.vae.training and not m.text_encoder.training
    opt = m.configure_optimizers()  # no LR scheduler given: the optimizer alone
    loss = m_step(m, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in m.vae.parameters())
    assert all(p.grad is None for p in m.text_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.unet.parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.unet.parameters()}


def m_step(m: StableDiffusionModule, batch: dict) -> torch.Tensor:
    """training_step without a Trainer attached (logging is a no-op then)."""
    m.log = lambda *a, **k: None
    m.optimizers = lambda: torch.optim.SGD(m.unet.parameters(), lr=0.0)
    return m.training_step(batch, 0)


def test_overfits_one_batch(tiny_model: Path, batch: dict):
    m = make(tiny_model, caption_dropout=0.0)
    m.train()
    opt = m.configure_optimizers()  # no LR scheduler given: the optimizer alone
    losses = []
    # same noise and timesteps every step: a fixed objective
    m.step_generator = lambda: diffusion.step_generator(0, 0, 0, 0, "cpu")
    for _ in range(60):
        loss = m_step(m, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_bad_options_fail_early(tiny_model: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="prediction_type"):
        make(tiny_model, prediction_type="x0")
    with pytest.raises(ValueError, match="caption_dropout"):
        make(tiny_model, caption_dropout=1.5)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        make(tmp_path)


def test_unet_from_config_is_fresh(tiny_model: Path):
    pretrained = make(tiny_model)
    scratch = make(tiny_model, unet_config=str(tiny_model / "unet" / "config.json"))
    assert scratch.unet.config.block_out_channels == pretrained.unet.config.block_out_channels
    a, b = pretrained.unet.state_dict(), scratch.unet.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_skipped_total_round_trips_through_the_checkpoint(tiny_model: Path):
    """The count is the run's total (summed over ranks as it is counted), restored as saved."""
    m = make(tiny_model)
    m.count_skipped(3)
    m.count_skipped(2)
    ckpt = {"state_dict": {f"unet.{k}": v for k, v in m.unet.state_dict().items()}}
    m.on_save_checkpoint(ckpt)
    assert ckpt["sdtrain"]["skipped_total"] == 5 and type(ckpt["sdtrain"]["skipped_total"]) is int
    fresh = make(tiny_model)
    fresh.on_load_checkpoint(ckpt)
    assert float(fresh.skipped_total) == 5.0
