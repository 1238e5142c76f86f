"""The README's first command: the demo trains, samples, checkpoints, logs to W&B, and exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrain.demo import shapes as demo
from tests.conftest import ROOT
from tests.wandb_files import history, offline_run

ROUNDS = range(200, 1201, 200)  # the demo samples every 200 of its 1200 steps
# The tests of the demo run (conftest's `demo_run`: the README's `sdtrain-train`, 1200 steps, 2.6 to
# 4.2 min on a 2-core CPU, a quarter of the default suite) are slow; CI (CI=true) runs them. Shorter
# runs in the default suite train, sample, checkpoint, log to W&B and export; only these judge that
# the demo learns its prompts.


@pytest.mark.slow  # the demo run
def test_demo_leaves_checkpoints_and_a_grid_per_round(demo_run: Path):
    ckpts = sorted(p.name for p in (demo_run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step_0001000.ckpt", "step_0001200.ckpt"]  # newest 2 + last
    grids = sorted(p.name for p in (demo_run / "samples").glob("step_*.png"))
    assert grids == [f"step_{s:07d}.png" for s in ROUNDS]
    assert Image.open(demo_run / "samples" / grids[-1]).size[0] >= 128


@pytest.mark.slow  # the demo run
def test_demo_samples_reach_wandb_offline_run_with_captions(demo_run: Path):
    run = offline_run(demo_run)
    rounds = [r for r in history(run) if "samples/filenames" in r]
    assert [r["trainer/global_step"] for r in rounds] == list(ROUNDS)
    last = rounds[-1]
    assert last["samples/captions"] == [
        "a red circle",
        "a green square",
        "a blue triangle",
        "a yellow circle",
    ]
    for name in last["samples/filenames"]:
        assert Image.open(run / "files" / name).size == (32, 32)
    losses = [r["train/loss"] for r in history(run) if "train/loss" in r]
    assert len(losses) >= 30 and np.isfinite(losses).all()


@pytest.mark.slow  # the demo run
def test_demo_last_grid_follows_its_prompts(demo_run: Path):
    """The last grid, read back from W&B: at least 3 of the 4 images in their prompt's colour and
    3 in its shape (4 tiles cannot show 90%: the next test samples 48 images and asks that of
    each attribute. With issue 24's data order one tile of this seed's grid, "a green square",
    came out yellow while the 48 samples passed)."""
    from sdtrain.demo.judge import judge, parse

    run = offline_run(demo_run)
    last = [r for r in history(run) if "samples/filenames" in r][-1]
    got = {}
    for caption, name in zip(last["samples/captions"], last["samples/filenames"], strict=True):
        got[caption] = judge(Image.open(run / "files" / name).convert("RGB"))
    assert sum(v.colour == parse(c).colour for c, v in got.items()) >= 3, got
    assert sum(v.shape == parse(c).shape for c, v in got.items()) >= 3, got


@pytest.mark.slow  # the demo run
def test_demo_draws_each_prompts_colour_and_shape(demo_run: Path):
    """The final EMA weights, sampled as the grid is (DDIM, its steps and guidance), draw every
    colour x shape prompt in its colour and shape: >= 90% per attribute over 12 prompts x 4 seeds,
    judged by sdtrain.demo.judge (a classifier fit on the demo's own renders, >= 98% right on them).

    All 12 prompts, a third of them per shape, so that a model drawing round blobs for everything
    (what the demo drew before it learned shapes: 38-50% of shapes right) fails.
    """
    got = judged(demo_run)
    assert got["colour"] >= 0.9 and got["shape"] >= 0.9, got


def judged(run: Path) -> dict[str, float]:
    """The share of 48 fresh samples from `run`'s last.ckpt (EMA weights; 12 colour x shape
    prompts x 4 seeds, sampled as its grids are) in their prompt's colour and in its shape."""
    from omegaconf import OmegaConf

    from sdtrain.artifacts.sample import Settings, load_pipeline, sample
    from sdtrain.demo.judge import score

    grid_cfg = OmegaConf.load(run / ".hydra" / "config.yaml").callbacks.sample_images
    prompts = [f"a {c} {s}" for c in demo.COLOURS for s in demo.SHAPES]
    settings = Settings(
        prompts,
        seeds=[0, 1, 2, 3],
        steps=grid_cfg.num_inference_steps,
        guidance_scale=grid_cfg.guidance_scale,
        sampler=grid_cfg.sampler,
        batch_size=len(prompts),
    )
    pipe = load_pipeline(run / "checkpoints" / "last.ckpt", settings.sampler)
    images = sample(pipe, settings)
    return score(images, [p for p, _ in settings.jobs()])


@pytest.mark.slow  # the demo run
def test_export_loads_in_diffusers_without_sdtrain(demo_run: Path, tmp_path: Path):
    from sdtrain.cli.export import main as export_main

    ckpt = demo_run / "checkpoints" / "last.ckpt"
    export_main([str(ckpt), str(tmp_path / "ema")])
    export_main([str(ckpt), str(tmp_path / "raw"), "--no-ema"])
    code = f"""
import sys
for name in ("sdtrain", "callbacks", "datamodules"):
    sys.modules[name] = None  # any import of ours now fails
import numpy as np, torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
pipe = StableDiffusionPipeline.from_pretrained({str(tmp_path / "ema")!r})
img = pipe("a blue square", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
assert img.size == (32, 32), img.size
ema = load_file({str(tmp_path / "ema/unet/diffusion_pytorch_model.safetensors")!r})
raw = load_file({str(tmp_path / "raw/unet/diffusion_pytorch_model.safetensors")!r})
assert ema.keys() == raw.keys()
assert any(not torch.equal(ema[k], raw[k]) for k in ema), "EMA export equals the raw weights"
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_export_errors_name_the_problem(tmp_path: Path):
    from sdtrain.cli.export import main as export_main

    missing = tmp_path / "nope.ckpt"
    with pytest.raises(SystemExit, match="nope.ckpt"):
        export_main([str(missing), str(tmp_path / "out")])


# The SDXL demo (README "SDXL"): `sdtrain-train experiment=demo_sdxl`, the SD demo's shapes and
# settings on a tiny SDXL for 2000 steps, made from nothing; judged as the SD demo is.
@pytest.fixture(scope="module")
def demo_sdxl_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo-sdxl") / "run"
    env = dict(os.environ, SDTRAIN_CACHE=str(tmp_path_factory.mktemp("demo-sdxl-cache")))
    cmd = [sys.executable, "-m", "sdtrain.cli.train", "experiment=demo_sdxl"]
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


@pytest.mark.slow  # the SDXL demo run
def test_sdxl_demo_draws_each_prompts_colour_and_shape(demo_sdxl_run: Path):
    """As test_demo_draws_each_prompts_colour_and_shape, on the SDXL demo's last.ckpt, sampled
    through StableDiffusionXLPipeline: >= 90% of 48 fresh samples in their prompt's colour, and
    as many in its shape."""
    from diffusers import StableDiffusionXLPipeline

    from sdtrain.artifacts.sample import load_pipeline

    grids = sorted(p.name for p in (demo_sdxl_run / "samples").glob("step_*.png"))
    assert grids == [f"step_{s:07d}.png" for s in range(200, 2001, 200)]  # its 2000 steps
    pipe = load_pipeline(demo_sdxl_run / "checkpoints" / "last.ckpt")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    got = judged(demo_sdxl_run)
    assert got["colour"] >= 0.9 and got["shape"] >= 0.9, got
