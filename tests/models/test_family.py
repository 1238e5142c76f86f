"""The model-family seam: the loader picks the family from the model, and the training step and
sampling go through it, so a family that differs reaches them without editing them."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.demo.tiny import build_parts
from sdtrain.models.families import detect
from sdtrain.models.family import SD, Family
from sdtrain.models.loader import check_model_folder, load_parts
from sdtrain.training import diffusion
from sdtrain.training.module import StableDiffusionModule


@pytest.fixture(scope="module")
def batch(shards: str, tiny_model: Path) -> dict:
    dm = WebDataModule(shards, str(tiny_model), resolution=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def step_loss(parts, batch: dict) -> torch.Tensor:
    """One training step's loss, with fixed draws and no Trainer."""
    m = StableDiffusionModule(parts, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    m.train()
    m.log = lambda *a, **k: None
    m.optimizers = lambda: torch.optim.SGD(m.unet.parameters(), lr=0.0)
    m.step_generator = lambda: diffusion.step_generator(0, 0, 0, 0, "cpu")
    return m.training_step(batch, 0).detach()


class Recording(Family):
    """SD, recording which of its methods the pipeline calls; `mute` zeroes the context."""

    name = "recording"

    def __init__(self, mute: bool = False) -> None:
        self.calls: list[str] = []
        self.mute = mute

    def condition(self, text_encoder, input_ids):
        self.calls.append("condition")
        cond = super().condition(text_encoder, input_ids)
        return {k: v * 0 for k, v in cond.items()} if self.mute else cond

    def unet_inputs(self, cond):
        self.calls.append("unet_inputs")
        return super().unet_inputs(cond)

    def scale_latents(self, vae_config, latents):
        self.calls.append("scale_latents")
        return super().scale_latents(vae_config, latents)

    def pipeline(self, *modules):
        self.calls.append("pipeline")
        return super().pipeline(*modules)


def test_a_diffusers_sd_folder_is_the_sd_family(tiny_model: Path):
    assert detect(tiny_model) is SD
    assert load_parts(tiny_model).family is SD
    assert SD.folders() == ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def test_a_model_of_another_family_is_named_before_it_loads(tiny_model: Path, tmp_path: Path):
    folder = tmp_path / "sd3"
    shutil.copytree(tiny_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps(index | {"_class_name": "StableDiffusion3Pipeline"})
    )
    want = rf"{folder / 'model_index.json'} names StableDiffusion3Pipeline: an SD3 model"
    with pytest.raises(ValueError, match=want):
        load_parts(folder)
    with pytest.raises(ValueError, match=want):
        check_model_folder(folder)


def test_latent_scaling_follows_the_vae_config():
    """SD's VAE: latents x scaling_factor (diffusers' StableDiffusionPipeline decodes latents /
    scaling_factor); a VAE config with a shift factor: (latents - shift) x scaling_factor, as
    diffusers' SD3 training scripts scale."""
    x = torch.randn(2, 4, 8, 8)

    class Config:
        scaling_factor = 0.18215

    torch.testing.assert_close(SD.scale_latents(Config(), x), x * 0.18215)
    Config.shift_factor = 0.0609
    torch.testing.assert_close(SD.scale_latents(Config(), x), (x - 0.0609) * 0.18215)


def test_the_step_and_sampling_go_through_the_family(batch: dict):
    parts = build_parts(32)
    sd_loss = step_loss(parts, batch)
    family = Recording()
    parts.family = family
    assert torch.equal(step_loss(parts, batch), sd_loss)  # the same maths, through the family
    assert {"condition", "unet_inputs", "scale_latents"} <= set(family.calls)
    # what the family conditions with is what the U-Net gets
    parts.family = Recording(mute=True)
    assert not torch.equal(step_loss(parts, batch), sd_loss)
    # sampling builds the family's pipeline
    m = StableDiffusionModule(parts, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    family = parts.family
    family.calls.clear()
    pipe = m.pipeline()
    assert family.calls == ["pipeline"]
    assert type(pipe).__name__ == SD.pipeline_class
