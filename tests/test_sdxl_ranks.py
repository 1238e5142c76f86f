"""SDXL on 2 real CPU processes (gloo): FSDP shards SDXL's U-Net (with its size/crop embedding) and
trains it as DDP does, from real shards through the real data path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_fsdp import load, load_start, run_two_ranks


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
    moved = 0
    for key, want in b["state_dict"].items():
        got = a["state_dict"][key]
        torch.testing.assert_close(
            got, want, rtol=1e-4, atol=2e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
        moved += not torch.equal(want, start[key[len("unet.") :]])
    assert moved > len(start) // 2
    for key in ("unet.add_embedding.linear_1.weight", "unet.add_embedding.linear_2.weight"):
        assert not torch.equal(b["state_dict"][key], start[key[len("unet.") :]]), key
