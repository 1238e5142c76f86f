"""SDXL in real processes: FSDP on 2 gloo ranks shards SDXL's U-Net (with its size/crop embedding)
and trains it as DDP does; a SIGKILLed SDXL run resumes bit for bit. Real shards, real data path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ranks_helpers import assert_weights_close, load_start
from tests.test_fsdp import load, run_two_ranks
from tests.test_resume_parity import assert_same, killed_and_whole
from tests.test_resume_parity import load as load_last


@pytest.mark.slow  # ~70 s: two 2-process runs; CI runs it
def test_sdxl_under_fsdp_trains_like_ddp(tiny_sdxl: Path, shards: str, tmp_path: Path):
    runs = {}
    for strategy in ("fsdp", "ddp"):
        runs[strategy] = tmp_path / strategy
        run_two_ranks(strategy, runs[strategy], tiny_sdxl, shards)
    a, b = load(runs["fsdp"]), load(runs["ddp"])
    assert a["global_step"] == b["global_step"] == 4
    start = load_start(tiny_sdxl)
    assert any(k.startswith("add_embedding.") for k in start)  # SDXL's size/crop + pooled input
    assert assert_weights_close(a["state_dict"], b["state_dict"], start) > len(start) // 2
    for key in ("unet.add_embedding.linear_1.weight", "unet.add_embedding.linear_2.weight"):
        assert not torch.equal(b["state_dict"][key], start[key[len("unet.") :]]), key


@pytest.fixture(scope="module")
def wide_shards(tmp_path_factory) -> str:
    """96 demo samples drawn 48 x 32, so a random crop to 32 x 32 moves (crop left 0-16)."""
    from PIL import Image

    from sdtrain.cli.shards import main as shards_main
    from sdtrain.demo import shapes as demo

    base = tmp_path_factory.mktemp("wide")
    images = base / "images"
    images.mkdir()
    for i, (img, caption) in enumerate(demo.samples(96, 32, seed=3)):
        wide = Image.new("RGB", (48, 32), (127, 127, 127))
        wide.paste(img, (i % 17, 0))
        wide.save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(caption)
    shards_main([str(images), str(base / "tars"), "--samples-per-shard", "24", "--keep-order"])
    return str(base / "tars" / "{00000..00003}.tar")


@pytest.mark.slow  # ~40 s: three launches, one SIGKILL; CI runs it
def test_sdxl_killed_and_resumed_ends_bit_for_bit_like_an_uninterrupted_run(
    tiny_sdxl: Path, wide_shards: str, tmp_path: Path
):
    """Random crops and flips of wide images change each sample's crop conditioning: a resume must
    redraw them as the uninterrupted run drew them, or SDXL's time_ids (and weights) would differ."""
    steps = 12
    whole, killed = killed_and_whole(
        tmp_path, tiny_sdxl, wide_shards, "data.center_crop=false", steps=steps
    )
    a, b = load_last(whole), load_last(killed)
    assert a["global_step"] == b["global_step"] == steps
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "sdtrain"):
        assert_same(a[key], b[key], key)
