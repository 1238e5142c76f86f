"""The frozen VAE and text encoder kept off the device between steps on a latent cache with text
(`model.offload_frozen`, sdtrain.training.offload): out of the step, in for sampling and
validation rounds and back after them, with samples, validation losses and weights equal to a
run that keeps them in (a CUDA test checks the bytes where a GPU is)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.cli.cache_latents import main as cache_main
from sdtrain.cli.train import train
from sdtrain.training.offload import plan
from tests.conftest import compose_cfg, tiny_overrides
from tests.training.offload_probe import OffloadProbe

PROBE = "+callbacks.offload_probe._target_=tests.training.offload_probe.OffloadProbe"


def make_cache(src: str, out: Path, model: Path, *extra: str) -> Path:
    args = [src, str(out), "--pretrained", str(model), "--resolution", "32", "--batch-size", "48",
            "--num-workers", "0", "--samples-per-shard", "48", "--accelerator", "cpu", *extra]  # fmt: skip
    cache_main(args)
    return out


@pytest.fixture(scope="module")
def text_cache(tiny_model: Path, shards: str, tmp_path_factory) -> Path:
    """The test shards' latents and CLIP contexts (sdtrain-cache-latents --text)."""
    return make_cache(shards, tmp_path_factory.mktemp("offload") / "cache", tiny_model, "--text")


def run(tmp: Path, model: Path, cache: Path, val: str, offload: str, *more: str):
    """4 steps on the cache; sampling, validation (held-out images) and checkpoints every 2."""
    overrides = ["data=latents", *tiny_overrides(model, str(cache), steps=4), "logger=none",
                 f"data.val_shards='{val}'", "callbacks.val_loss.every_n_steps=2",
                 "callbacks.sample_images.every_n_steps=2", f"model.offload_frozen={offload}",
                 "callbacks.val_loss.timesteps=2", "callbacks.sample_images.prompts=[a red circle]",
                 "trainer.precision=32", PROBE, *more]  # fmt: skip
    value = train(compose_cfg(tmp, overrides))
    return value, OffloadProbe.last


def test_frozen_parts_stay_out_of_steps_and_come_in_for_rounds(
    tiny_model: Path, shards: str, text_cache: Path, tmp_path: Path
):
    val = shards.replace("{00000..00003}", "00003")  # held-out images: the VAE and CLIP run
    on_value, on = run(tmp_path / "on", tiny_model, text_cache, val, "auto")
    off_value, off = run(tmp_path / "off", tiny_model, text_cache, val, "false")

    # offloaded: no longer submodules (Lightning's .to(device) and state_dict skip them), and in
    # host memory at every batch's start and end, rounds included (they run in on_batch_end)
    assert on.registered == set() and off.registered == {"vae", "text_encoder"}
    assert len(on.steps) == 8
    assert all(s["placement"] == {"vae": "host", "text_encoder": "host"} for s in on.steps)
    assert all(s["placement"] == {} for s in off.steps)
    # every forward of a frozen part after the first step ran inside a round, with both in; the
    # first step's (the empty caption's CLIP context, cached for caption dropout) CLIP alone
    first = [c for c in on.calls if c["step"] == 0]
    rounds = [c for c in on.calls if c["step"] > 0]
    assert first and {c["part"] for c in first} == {"text_encoder"}
    assert all(c["placement"] == {"vae": "host", "text_encoder": "device"} for c in first)
    assert {c["step"] for c in rounds} == {2, 4}
    assert {c["part"] for c in rounds} == {"vae", "text_encoder"}
    assert all(c["placement"] == {"vae": "device", "text_encoder": "device"} for c in rounds)
    # the same forwards in the run without offload, at the same steps
    assert [(c["part"], c["step"]) for c in off.calls] == [(c["part"], c["step"]) for c in on.calls]

    # same samples, validation loss and weights
    assert on_value == pytest.approx(off_value, rel=0, abs=0) and np.isfinite(on_value)
    for step in (2, 4):
        name = f"samples/step_{step:07d}.png"
        a, b = (np.asarray(Image.open(tmp_path / r / name)) for r in ("on", "off"))
        assert np.array_equal(a, b), name
    ckpts = [torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True)
             for r in ("on", "off")]  # fmt: skip
    assert ckpts[0]["state_dict"].keys() == ckpts[1]["state_dict"].keys()
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in ckpts[0]["state_dict"])
    for k, v in ckpts[0]["state_dict"].items():
        assert torch.equal(v, ckpts[1]["state_dict"][k]), k


def test_plan_offloads_what_the_data_makes_needless():
    text, latents_only = {"text": True}, {"text": False}
    assert plan("auto", text, text_encoder_trains=False) == ("vae", "text_encoder")
    assert plan("auto", latents_only, text_encoder_trains=False) == ("vae",)
    assert plan("auto", text, text_encoder_trains=True) == ("vae",)  # LoRA on CLIP, new tokens
    assert plan("auto", None, text_encoder_trains=False) == ()  # image shards: the step encodes
    assert plan(True, text, text_encoder_trains=False) == ("vae", "text_encoder")
    assert plan(False, text, text_encoder_trains=False) == ()
    with pytest.raises(ValueError, match=r"model.offload_frozen=true .* latent cache"):
        plan(True, None, text_encoder_trains=False)


def test_bad_mode_is_named(tiny_model: Path, shards: str, tmp_path: Path):
    overrides = tiny_overrides(tiny_model, shards, steps=1) + ["model.offload_frozen=sometimes"]
    with pytest.raises(Exception, match=r"model.offload_frozen='sometimes' must be auto, true"):
        train(compose_cfg(tmp_path, overrides))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_memory_excludes_the_frozen_parts_on_cuda(
    tiny_model: Path, shards: str, text_cache: Path, tmp_path: Path
):
    """On the GPU: the parts' parameters are on the CPU during steps and on CUDA in rounds, and
    the bytes allocated at each step's start are the run without offload's less the VAE's and
    CLIP's tensors (each rounded up to the caching allocator's 512-byte blocks; < 1 MiB more
    for a large one)."""
    val = shards.replace("{00000..00003}", "00003")
    gpu = ["trainer.accelerator=gpu", "trainer.devices=1"]
    _, on = run(tmp_path / "on", tiny_model, text_cache, val, "true", *gpu)
    _, off = run(tmp_path / "off", tiny_model, text_cache, val, "false", *gpu)
    assert all(s["devices"] == {"vae": "cpu", "text_encoder": "cpu"} for s in on.steps)
    assert all(s["devices"] == {"vae": "cuda", "text_encoder": "cuda"} for s in off.steps)
    rounds = [c for c in on.calls if c["step"] > 0]
    assert rounds and all(c["devices"] == {"vae": "cuda", "text_encoder": "cuda"} for c in rounds)

    from sdtrain.models.parts import load_frozen

    vae, text_encoder, *_ = load_frozen(str(tiny_model))  # the parts as a run loads them
    tensors = [t for m in (vae, text_encoder) for t in (*m.parameters(), *m.buffers())]
    exact = sum(t.numel() * t.element_size() for t in tensors)
    blocks = sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)
    # a block over 1 MiB whose free rest would be under 1 MiB is not split: allocated whole
    blocks += sum(2**20 for t in tensors if t.numel() * t.element_size() > 2**20)
    for a, b in zip(on.steps, off.steps, strict=True):
        assert a["step"] == b["step"]
        assert exact <= b["allocated"] - a["allocated"] <= blocks, a["step"]
