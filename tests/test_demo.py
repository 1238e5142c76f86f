"""The README's first command: the demo trains, samples, checkpoints, logs to W&B, and exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrain import demo
from tests.wandb_files import history, offline_run


def test_demo_leaves_checkpoints_and_a_grid_per_round(demo_run: Path):
    ckpts = sorted(p.name for p in (demo_run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step_0000300.ckpt", "step_0000400.ckpt"]  # newest 2 + last
    grids = sorted(p.name for p in (demo_run / "samples").glob("step_*.png"))
    assert grids == [f"step_{s:07d}.png" for s in (100, 200, 300, 400)]
    assert Image.open(demo_run / "samples" / grids[-1]).size[0] >= 128


def test_demo_samples_reach_wandb_offline_run_with_captions(demo_run: Path):
    run = offline_run(demo_run)
    rounds = [r for r in history(run) if "samples/filenames" in r]
    assert [r["trainer/global_step"] for r in rounds] == [100, 200, 300, 400]
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


def test_demo_last_grid_follows_its_prompts(demo_run: Path):
    """Each prompt's image is drawn in the colour the prompt names (mean colour over background)."""
    run = offline_run(demo_run)
    last = [r for r in history(run) if "samples/filenames" in r][-1]
    got = {}
    for caption, name in zip(last["samples/captions"], last["samples/filenames"], strict=True):
        got[caption] = demo.dominant_colour(Image.open(run / "files" / name).convert("RGB"))
    assert got == {c: c.split()[1] for c in got}, got


def test_export_loads_in_diffusers_without_sdtrain(demo_run: Path, tmp_path: Path):
    from sdtrain.export import main as export_main

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
    from sdtrain.export import main as export_main

    missing = tmp_path / "nope.ckpt"
    with pytest.raises(SystemExit, match="nope.ckpt"):
        export_main([str(missing), str(tmp_path / "out")])
