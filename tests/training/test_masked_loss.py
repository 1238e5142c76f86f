"""The masked loss (sdtrain.training.masked_loss): its weighting against numpy's weighted mean and
block means, and in a real training step of SD and SDXL, no gradient outside the mask at floor 0."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate
from PIL import Image

from sdtrain.cli.train import build_model
from sdtrain.datamodules import batch as B
from sdtrain.datamodules.masks import MaskTransform, latent_mask
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.models.loader import load_parts
from sdtrain.training import diffusion
from sdtrain.training.masked_loss import mask_weights, weighted_per_sample
from sdtrain.training.module import StableDiffusionModule
from tests.conftest import compose_cfg, cpu_trainer, tiny_overrides

SIDE = 32  # pixels
EDGE = 13  # the mask is 0 left of this column, 1 from it: a latent cell of the edge is partial


def test_weighting_against_numpy():
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(3, 4, 6, 6, generator=g)  # (B, C, h, w) elementwise
    mask = torch.rand(3, 1, 12, 12, generator=g)
    mask[2] = 0.0  # an empty mask at floor 0 weighs nothing
    cells = latent_mask(mask, (6, 6))
    blocks = mask.numpy().reshape(3, 1, 6, 2, 6, 2).mean(axis=(3, 5))  # each cell's 2x2 pixels
    np.testing.assert_allclose(cells.numpy(), blocks, rtol=1e-6)
    for floor in (0.0, 0.3):
        w = mask_weights(cells, floor)
        np.testing.assert_allclose(w.numpy(), floor + (1 - floor) * blocks, rtol=1e-6)
        wide = np.broadcast_to(w.numpy(), loss.shape)
        got = weighted_per_sample(loss, w).numpy()
        for i in range(3):
            if wide[i].sum() == 0:
                assert got[i] == 0.0
            else:  # numpy's weighted average of the sample's elements
                assert got[i] == pytest.approx(np.average(loss[i].numpy(), weights=wide[i]))
        kohya = (loss.numpy() * wide).mean(axis=(1, 2, 3))  # sd-scripts: mean of loss x mask
        np.testing.assert_allclose(weighted_per_sample(loss, w, False).numpy(), kohya, rtol=1e-6)
    plain = diffusion.diffusion_loss(loss, torch.zeros_like(loss))  # no mask
    ones = diffusion.diffusion_loss(
        loss, torch.zeros_like(loss), mask_weights=torch.ones(3, 1, 6, 6)
    )
    assert torch.allclose(plain, ones)  # a full mask is the plain loss


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def masked_shard(tmp_path_factory) -> str:
    """8 noise images with a mask that is 0 left of column EDGE and 1 from it."""
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[:, EDGE:] = 255
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("masked") / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(8):
            img = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
            sink.write({"__key__": f"{i:03d}", "png": png(img), "txt": b"noise",
                        "mask.png": png(Image.fromarray(mask))})  # fmt: skip
    return str(path)


class GradSpy(StableDiffusionModule):
    """Keeps each step's batch mask, draws, prediction, loss and d(loss)/d(prediction)."""

    def on_train_start(self) -> None:
        self.steps: list[dict] = []

    def latents_and_context(self, batch, g):
        latents, cond, d = super().latents_and_context(batch, g)
        self.steps.append({"latents": latents.detach(), "mask": batch[B.MASK], **d})
        return latents, cond, d

    def forward(self, noisy, timesteps, cond):
        pred = super().forward(noisy, timesteps, cond)
        step = self.steps[-1]
        step["pred"] = pred.detach()
        pred.register_hook(lambda grad: step.update(grad=grad.detach().clone()))
        return pred

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.steps[-1]["loss"] = loss.detach()
        return loss


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_floor_zero_gives_no_gradient_outside_the_mask(
    family: str, masked_shard: str, request: pytest.FixtureRequest
):
    model = request.getfixturevalue("tiny_model" if family == "sd" else "tiny_sdxl")
    m = GradSpy(load_parts(model), optimizer=partial(torch.optim.AdamW, lr=1e-3),
                caption_dropout=0.0, mask_floor=0.0, min_snr_gamma=5.0)  # fmt: skip
    dm = WebDataModule(masked_shard, str(model), resolution=SIDE, batch_size=4, num_workers=0,
                       random_flip=False, center_crop=True, mask="file")  # fmt: skip
    cpu_trainer(max_steps=2).fit(m, datamodule=dm)
    for step in m.steps:
        grad, pred = step["grad"], step["pred"]  # (B, C, h, w)
        cells = latent_mask(step["mask"], grad.shape[-2:])[:, 0]  # (B, h, w)
        f = SIDE // grad.shape[-1]  # VAE downsampling
        assert (cells == 0).any() and (cells == 1).any() and ((0 < cells) & (cells < 1)).any()
        assert bool((grad.permute(1, 0, 2, 3)[:, cells == 0] == 0).all())  # not one element
        assert bool((grad.permute(1, 0, 2, 3)[:, cells > 0] != 0).all())
        assert int((cells[0, 0] == 0).sum()) == EDGE // f  # columns wholly left of the edge
        # the loss: per sample numpy's weighted mean of the squared error, min-SNR weighted
        scheduler = m.noise_scheduler
        target = diffusion.target_for(scheduler, step["latents"], step["noise"], step["t"])
        sq = ((pred - target) ** 2).double().numpy()
        w = np.broadcast_to(cells[:, None].double().numpy(), sq.shape)
        per = np.array([np.average(sq[i], weights=w[i]) for i in range(len(sq))])
        snr_w = diffusion.min_snr_weights(
            diffusion.snr(scheduler.alphas_cumprod, step["t"]), 5.0,
            scheduler.config.prediction_type,
        )  # fmt: skip
        assert step["loss"].item() == pytest.approx(float((per * snr_w.numpy()).mean()), rel=1e-5)


def test_config_keys_reach_the_module_and_data(tiny_model: Path, shards: str, tmp_path: Path):
    opts = ["data.mask=alpha", "model.mask_floor=0.25", "model.mask_normalize=false"]
    cfg = compose_cfg(tmp_path, [*tiny_overrides(tiny_model, shards), *opts])
    m = build_model(cfg.model)
    assert (m.hparams.mask_floor, m.hparams.mask_normalize) == (0.25, False)
    dm = instantiate(cfg.data)
    assert dm.hparams.mask == "alpha" and isinstance(dm.transform(), MaskTransform)
    with pytest.raises(Exception, match=r"model\.mask_floor=1\.5 is not in \[0, 1\]"):
        build_model(compose_cfg(tmp_path, [*tiny_overrides(tiny_model, shards),
                                           "model.mask_floor=1.5"]).model)  # fmt: skip
