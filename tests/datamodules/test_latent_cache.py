"""The latent cache end to end: sdtrain-cache-latents on the test shards, read back through
WebDataModule, trained on like the pixels it came from, and refused for another model's VAE."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from sdtrain.artifacts.cache import (
    check_latent_cache,
    text_encoder_fingerprint,
    vae_fingerprint,
)
from sdtrain.cli.cache_latents import main
from sdtrain.cli.train import train
from sdtrain.datamodules import batch as B
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.models.loader import load_parts
from sdtrain.models.parts import load_frozen
from sdtrain.training import diffusion
from sdtrain.training.module import StableDiffusionModule
from tests.conftest import ROOT, compose_cfg, tiny_overrides

KINDS = {"fp16": [], "bf16-text": ["--dtype", "bf16", "--text"]}


def cache_args(src: str, out: Path, model: Path) -> list[str]:
    return [src, str(out), "--pretrained", str(model), "--resolution", "32", "--batch-size", "32",
            "--num-workers", "0", "--samples-per-shard", "40", "--accelerator", "cpu"]  # fmt: skip


@pytest.fixture(scope="module", params=list(KINDS))
def cache(request, tiny_model: Path, shards: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / request.param
    main(cache_args(shards, out, tiny_model) + KINDS[request.param])
    return out


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A second tiny model: same shapes, another (random) VAE."""
    from sdtrain.demo.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("other") / "tiny-sd", vae_steps=0, seed=1)


def datamodule(shards: str | Path, model: Path, **kw) -> WebDataModule:
    """One pass in file order, centre crop, no flip: every sample once, as it was cached."""
    kw = {"resolution": 32, "center_crop": True, "batch_size": 96, "num_workers": 0} | kw
    return WebDataModule(str(shards), str(model), resampled=False, shuffle_buffer=1, **kw)


def first_batch(dm: WebDataModule) -> dict:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def loss_of(m: StableDiffusionModule, batch: dict) -> torch.Tensor:
    """training_step without a Trainer, with the same draws on every call."""
    m.log = lambda *a, **k: None
    m.optimizers = lambda: torch.optim.SGD(m.unet.parameters(), lr=0.0)
    m.step_generator = lambda: diffusion.step_generator(0, 0, 0, 0, "cpu")
    return m.training_step(batch, 0)


def test_cache_holds_moments_captions_and_crops(cache: Path, tiny_model: Path, shards: str):
    info = json.loads((cache / "cache.json").read_text())
    vae, text_encoder, _, _ = load_frozen(tiny_model)
    text = cache.name == "bf16-text"
    assert info["format_version"] == 1 and info["sdtrain_version"]
    assert info["pretrained"] == str(tiny_model) and info["vae_fingerprint"] == vae_fingerprint(vae)
    assert (info["resolution"], info["center_crop"], info["random_flip"]) == (32, True, False)
    assert info["dtype"] == ("bf16" if text else "fp16") and info["text"] is text
    assert info["text_encoder_fingerprint"] == (
        text_encoder_fingerprint(text_encoder) if text else None
    )
    assert info["latent_shape"] == [8, 16, 16] and info["samples"] == 96
    assert info["shards"] == ["00-00000.tar", "00-00001.tar", "00-00002.tar"]  # 40 + 40 + 16
    with tarfile.open(cache / "00-00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = min(members).split(".")[0]
    ext = info["files"][B.LATENT_DIST]
    assert ext == ("latent_dist.bf16.npy" if text else "latent_dist.npy")
    assert {n for n in members if n.startswith(key + ".")} == {
        f"{key}.{e}" for e in ["txt", "json", *info["files"].values()]
    }
    moments = np.load(io.BytesIO(members[f"{key}.{ext}"]), allow_pickle=False)
    assert moments.shape == (8, 16, 16) and moments.dtype == (np.uint16 if text else np.float16)
    meta = json.loads(members[f"{key}.json"])
    assert meta == {"original_size": [32, 32], "resized_size": [32, 32],
                    "crop_box": [0, 0, 32, 32], "flipped": False}  # fmt: skip
    assert members[f"{key}.txt"].decode().startswith("a ")
    with pytest.raises(SystemExit, match="already holds shards"):  # never mixes two runs' shards
        main(cache_args(shards, cache, tiny_model))


def test_cached_batch_trains_like_the_pixel_batch(cache: Path, tiny_model: Path, shards: str):
    """Same samples, same draws: the cached moments and the loss match the on-the-fly path within
    the storage dtype's rounding."""
    dm = datamodule(cache, tiny_model, resolution=None)
    cached = first_batch(dm)
    assert dm.latent_cache_info["folder"] == str(cache)
    pixels = first_batch(datamodule(shards, tiny_model))
    text = B.CONTEXT in cached
    assert cached[B.LATENT_DIST].shape == (96, 8, 16, 16)
    assert cached[B.LATENT_DIST].dtype == torch.float32 and cached[B.SKIPPED] == 0
    assert (B.INPUT_IDS in cached) is not text and B.PIXELS not in cached
    assert sorted(cached[B.KEYS]) == sorted(pixels[B.KEYS])  # every sample once, no other
    at = [pixels[B.KEYS].index(k) for k in cached[B.KEYS][:8]]
    assert [pixels[B.CAPTIONS][i] for i in at] == cached[B.CAPTIONS][:8]
    m = StableDiffusionModule(
        load_parts(tiny_model), optimizer=torch.optim.AdamW, caption_dropout=0.0
    )
    m.eval()
    rtol = 2**-8 if text else 2**-11  # bf16 or fp16 rounding
    with torch.no_grad():
        fresh = m.vae.encode(pixels[B.PIXELS][at]).latent_dist.parameters
        torch.testing.assert_close(cached[B.LATENT_DIST][:8], fresh, rtol=rtol, atol=1e-5)
        reference = loss_of(
            m, {B.PIXELS: pixels[B.PIXELS][at], B.INPUT_IDS: pixels[B.INPUT_IDS][at]}
        )
        image = {B.LATENT_DIST: cached[B.LATENT_DIST][:8]}
        caption = {k: cached[k][:8] for k in (B.CONTEXT, B.INPUT_IDS) if k in cached}
        loss = loss_of(m, image | caption)
    # the loss averages rounding errors away: well within one rounding step (a flip is 10x more)
    torch.testing.assert_close(loss, reference, rtol=rtol / 4, atol=0.0)


class CheckedModule(StableDiffusionModule):
    """The module with the latent-cache check its on_fit_start gets (see sdtrain.artifacts.cache)."""

    def on_fit_start(self) -> None:
        dm = self._trainer.datamodule if self._trainer is not None else None
        info = getattr(dm, "latent_cache_info", None)
        if info is not None:  # a latent cache must come from this model's VAE (and text encoder)
            check_latent_cache(info, self.vae, self.text_encoder, self.pretrained)
        super().on_fit_start()

    def training_step(self, batch, batch_idx):
        raise AssertionError("trained on a latent cache of another VAE")


def test_cache_of_another_vae_is_refused_before_the_first_step(
    cache: Path, tiny_model: Path, other_model: Path
):
    info = datamodule(cache, other_model, resolution=None).latent_cache_info
    ours, theirs = load_frozen(tiny_model), load_frozen(other_model)
    check_latent_cache(info, ours[0], ours[1], str(tiny_model))  # its own model: accepted
    with pytest.raises(ValueError) as refused:
        check_latent_cache(info, theirs[0], theirs[1], str(other_model))
    for named in (cache, info["vae_fingerprint"], other_model, vae_fingerprint(theirs[0])):
        assert str(named) in str(refused.value)
    if info["text"]:  # cached contexts: the text encoder must match too
        with pytest.raises(ValueError, match="text encoder fingerprint"):
            check_latent_cache(info, ours[0], theirs[1], str(other_model))
    m = CheckedModule(load_parts(other_model), optimizer=partial(torch.optim.AdamW, lr=1e-3))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match=info["vae_fingerprint"]):
        trainer.fit(m, datamodule=datamodule(cache, other_model, resolution=None, batch_size=4))


def test_datamodule_refuses_what_a_cache_cannot_honour(cache: Path, tiny_model: Path, shards: str):
    cases = [
        (datamodule(cache, tiny_model, resolution=64), "data.resolution=64"),
        (datamodule(cache, tiny_model, resolution=None, random_flip=True), "random_flip"),
        (datamodule(cache, tiny_model, resolution=None, latent_cache=False), "latent_cache=false"),
        (datamodule(shards, tiny_model, latent_cache=True), "no latent cache"),
        (datamodule(shards, tiny_model, resolution=None), "data.resolution=null"),
    ]
    for dm, message in cases:
        with pytest.raises(ValueError, match=message):
            dm.setup("fit")
    with pytest.raises(ValueError, match="mixes the latent cache"):
        WebDataModule([str(cache), shards], str(tiny_model))


@pytest.mark.parametrize("cache", ["fp16"], indirect=True)  # one cache is enough to train on
def test_trains_two_steps_from_the_cache(cache: Path, tiny_model: Path, tmp_path: Path):
    overrides = ["data=latents"] + tiny_overrides(tiny_model, str(cache), steps=2) + ["logger=none"]
    loss = train(compose_cfg(tmp_path, overrides))
    assert loss is not None and np.isfinite(loss)
    ckpt = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert ckpt["global_step"] == 2


@pytest.mark.slow
def test_two_ranks_write_apart(tiny_model: Path, shards: str, tmp_path: Path):
    """DDP on the CPU (2 processes): each rank writes its own shards, rank 0 the cache.json."""
    cmd = [sys.executable, "-m", "sdtrain.cli.cache_latents"]
    cmd += cache_args(shards, tmp_path / "cache", tiny_model) + ["--devices", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert info["shards"] == ["00-00000.tar", "00-00001.tar", "01-00000.tar", "01-00001.tar"]
    assert info["samples"] == 96
    keys = first_batch(datamodule(tmp_path / "cache", tiny_model, resolution=None))[B.KEYS]
    assert len(set(keys)) == 96
