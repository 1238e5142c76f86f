"""The learning-parity harness (scripts/parity.py): its pieces, and one CPU-sized run of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from scripts import parity
from tests.conftest import ROOT


def test_render_set_labels_match_demo_captions():
    images, labels = parity.render_set(24, seed=0)
    from sdtrain.demo import shapes as demo

    captions = [c for _, c in demo.samples(24, 32, seed=0)]
    assert [parity.caption(int(y)) for y in labels] == captions
    assert images[0].size == (32, 32) and labels.tolist() == list(range(12)) * 2


def test_write_shards_holds_the_in_memory_images(tmp_path: Path):
    images, labels = parity.render_set(48, seed=0)
    pattern = parity.write_shards(images, labels, tmp_path, n_shards=16)
    assert pattern == f"{tmp_path}/shards/{{00000..00015}}.tar"
    samples = list(wds.WebDataset(pattern, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 48
    for i in (0, 17, 47):
        got = samples[i]
        assert got["txt"] == parity.caption(int(labels[i]))
        assert np.array_equal(got["png"], np.asarray(images[i]))  # (32, 32, 3) uint8, lossless


class FixedJudge(torch.nn.Module):
    """Always answers class `label` (for checking the scoring arithmetic)."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # score() reads the device from here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((len(x),), self.label), 12).float()


def test_score_splits_colour_and_shape():
    labels = torch.arange(12)  # red circle, red square, ..., yellow triangle
    s = parity.score(FixedJudge(0), torch.zeros(12, 3, 32, 32), labels)  # "a red circle" always
    assert s == pytest.approx({"accuracy": 1 / 12, "colour": 3 / 12, "shape": 4 / 12})


def test_judge_learns_colour_from_a_few_renders():
    judge, s = parity.train_judge(n_train=480, n_test=120, device="cpu", epochs=2)
    assert isinstance(judge, parity.Judge) and s["colour"] > 0.9


def test_sdtrain_overrides_quote_shards_and_match_the_budget(tmp_path: Path):
    a = parity.parse_args(
        ["--out", str(tmp_path), "--steps", "7", "--batch-size", "4", "--device", "cpu",
         "--sdtrain-override", "trainer.gradient_clip_val=null"]
    )  # fmt: skip
    o = parity.sdtrain_overrides(a, Path("/m"), "/s/{00000..00015}.tar", 3, tmp_path / "run")
    assert "data.train_shards='/s/{00000..00015}.tar'" in o
    for want in ("trainer.max_steps=7", "data.batch_size=4", "seed=3", "trainer=cpu",
                 "model.lr_scheduler.name=constant", "~callbacks.sample_images", "logger=none"):  # fmt: skip
        assert want in o
    assert o[-1] == "trainer.gradient_clip_val=null"  # extra overrides come last, so they win


def run_parity(cmd: list[str], out: Path, timeout: int) -> dict:
    """Run the harness `cmd` from the repo root (on PYTHONPATH); return its OUT/parity.json."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "parity.json").read_text())


@pytest.mark.slow
def test_parity_cpu_run(tmp_path: Path):
    """~6 min on an idle 2-core CPU: both trainers at 300 steps x batch 32, 4 images a prompt."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "parity.py"),
        "--out", str(tmp_path),
        "--steps", "300",
        "--batch-size", "32",
        "--n-train", "1200",
        "--per-class", "4",
        "--seeds", "0",
        "--device", "cpu",
    ]  # fmt: skip
    result = run_parity(cmd, tmp_path, timeout=1800)
    assert result["judge"]["real"]["accuracy"] >= 0.95
    (row,) = result["seeds"]
    ref, raw = row["reference"], row["sdtrain_raw"]
    # The reference learns: far above chance (1/12) on the prompt, and mostly right on colour.
    assert ref["accuracy"] > 3 / 12 and ref["colour"] >= 0.6, ref
    # A loose CPU margin: at 300 steps one seed's gap is mostly noise (48 samples, one image is
    # 0.02; raw minus reference measured -0.125, +0.08, +0.15, 0.00 on seeds 0-3, means 0.56 vs
    # 0.54), so this catches a pipeline that learns far worse, not a small deficit. The tight
    # comparison is the GPU command in scripts/parity.py's docstring (docs/parity.md).
    assert raw["accuracy"] >= ref["accuracy"] - 0.15, (raw, ref)
    assert raw["colour"] >= 0.6, raw


def test_glyphs_render_the_same_from_a_seed_class_by_class():
    from scripts import glyphs

    images, labels = glyphs.render_set(20, seed=0)
    again, _ = glyphs.render_set(20, seed=0)
    assert labels.tolist() == sorted(labels.tolist()) == [c for c in range(10) for _ in range(2)]
    px = np.stack([np.asarray(i) for i in images])  # (20, 32, 32, 3)
    assert np.array_equal(px, np.stack([np.asarray(i) for i in again]))
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()  # greyscale
    assert px.mean() > 150 and (px.reshape(20, -1).min(1) < 100).all()  # dark strokes on light
    assert glyphs.caption(3) == "the letter Q"
    four, y4 = glyphs.render_set(8, seed=1, classes=4)
    assert y4.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and len(four) == 8


def test_pinned_posterior_std_makes_a_sample_its_mean():
    """The glyphs model's VAE: on-the-fly encoding (sdtrain) equals encoding once (the loop)."""
    from scripts.parity_tasks import pin_posterior_std
    from sdtrain.demo.tiny import build_vae

    vae = build_vae(32).eval()
    pin_posterior_std(vae)
    with torch.no_grad():
        dist = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist
    assert dist.std.max() < 1e-6
    assert torch.allclose(dist.sample(), dist.mean, atol=1e-5)


def test_parity_sdtrain_runs_train_your_own_shards_unflipped(tmp_path: Path):
    """The demo's data group mirrors every image (its shapes are symmetric): a mirrored letter is
    another class, so the harness trains sdtrain as a user trains their own shards."""
    a = parity.parse_args(["--out", str(tmp_path), "--task", "glyphs", "--device", "cpu"])
    o = parity.sdtrain_overrides(a, Path("/m"), "/s/{00000..00008}.tar", 0, tmp_path / "run")
    assert "data=webdataset" in o and "data.random_flip=false" in o
    assert (a.n_train, a.shards) == (1800, 9)  # 9 shards of 200, one or two classes each


# sdtrain may trail the loop by this much at the CPU size before the test fails (docs/parity.md:
# the seeds' spread there)
RAW_MARGIN, EMA_MARGIN = 0.06, 0.1


@pytest.mark.slow
def test_glyphs_parity_cpu_run(tmp_path: Path):
    """~13 min on an idle 2-core CPU: the glyphs task's first 4 classes (C, G, O, Q: two near
    pairs) from 3 class-sorted shards, both trainers at 1000 steps x batch 32, 16 images a prompt.

    Fails on the code before issue 24's fixes: sdtrain then learned 0.56 raw / 0.70 EMA here
    against the loop's 0.86 (seed 0; its own shards on the demo's flipping data group), and 0.78
    raw with the flips off (class-sorted shards drawn with replacement). docs/parity.md has the
    seeds and the spread."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "parity.py"),
        "--out", str(tmp_path),
        "--task", "glyphs",
        "--classes", "4",
        "--steps", "1000",
        "--batch-size", "32",
        "--per-class", "16",
        "--judge-n", "2000",
        "--seeds", "0",
        "--device", "cpu",
    ]  # fmt: skip
    result = run_parity(cmd, tmp_path, timeout=2700)
    assert result["judge"]["real"]["accuracy"] >= 0.95
    assert result["judge"]["latent_real"]["accuracy"] >= 0.95
    (row,) = result["seeds"]
    ref, raw, ema = row["reference"], row["sdtrain_raw"], row["sdtrain_ema"]
    assert ref["accuracy"] >= 0.7, ref  # the loop learns the pairs apart (chance 0.25)
    assert raw["accuracy"] >= ref["accuracy"] - RAW_MARGIN, (raw, ref)
    assert ema["accuracy"] >= ref["accuracy"] - EMA_MARGIN, (ema, ref)


def test_loader_mixes_class_sorted_shards_from_the_first_batch(
    tmp_path: Path, tiny_model: Path, monkeypatch
):
    """4 classes in 4 one-class shards (a folder sorted by class, written in order): the first
    batch already holds every class, and no class's share over 50 steps strays far from 1/4.
    Before issue 24's fix the first batches came from one shard (webdataset's buffer starts at
    100) and shards drawn with replacement left classes out for long stretches."""
    from scripts import data_mixing, glyphs

    images, labels = glyphs.render_set(4 * 60, seed=0, classes=4)
    monkeypatch.setattr(parity, "TASK", parity.TASKS["glyphs"](4))  # its captions
    pattern = parity.write_shards(images, labels, tmp_path, n_shards=4)
    m = data_mixing.main(
        [pattern, "--model", str(tiny_model), "--workers", "0", "--batch-size", "16",
         "--shuffle-buffer", "240", "--steps", "120"]
    )  # fmt: skip
    assert m["classes"] == 4
    first = m["first_batches_classes"]  # 16 uniform draws miss one of 4 classes 4% of the time
    assert first[0] == 4 and min(first) >= 3, first
    assert 0.15 <= m["window_min"] and m["window_max"] <= 0.35, m  # uniform: ~0.20-0.30
