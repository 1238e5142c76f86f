"""The bad-data limit: a run drawing mostly unusable samples stops, naming kinds and shards."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from sdtrain.cli.train import train
from sdtrain.datamodules import batch as B
from sdtrain.training.skips import CHECK_EVERY, BadDataError, SkipTally
from tests.conftest import compose_cfg, tiny_overrides
from tests.datamodules.test_webdataset import png, write_tar


def batch(skipped: int, shard: str = "bad.tar") -> dict:
    return {
        B.PIXELS: torch.zeros(4, 3, 8, 8),
        B.SKIPPED: skipped,
        B.SKIPPED_KINDS: {"decode": skipped},
        B.SKIPPED_SHARDS: {shard: skipped} if skipped else {},
    }


def test_limit_applies_past_min_samples_and_names_the_worst_shards():
    tally = SkipTally(max_fraction=0.5, min_samples=200)
    for _ in range(CHECK_EVERY):  # 4 good + 4 bad per batch: 50%, not more
        tally.add(batch(4), torch.device("cpu"), None)
    assert int(tally.drawn) == 8 * CHECK_EVERY and int(tally.total) == 4 * CHECK_EVERY
    for i in range(CHECK_EVERY - 1):  # 80% bad from here, but no check until the 20th batch
        tally.add(batch(16, f"s{i % 2}.tar"), torch.device("cpu"), None)
    with pytest.raises(BadDataError, match=r"of \d+ data samples .*\(decode \d+\).*s0.tar \(\d+\)"):
        tally.add(batch(16, "s1.tar"), torch.device("cpu"), None)


def test_no_limit_and_too_few_samples_never_stop():
    none = SkipTally(max_fraction=None)
    few = SkipTally(max_fraction=0.1, min_samples=10**6)
    for _ in range(2 * CHECK_EVERY):
        none.add(batch(100), torch.device("cpu"), None)
        few.add(batch(100), torch.device("cpu"), None)
    with pytest.raises(ValueError, match="max_bad_data_fraction=0"):
        SkipTally(max_fraction=0.0)


def test_a_run_on_mostly_broken_shards_stops_naming_them(tiny_model: Path, tmp_path: Path):
    good = {"png": png(32), "txt": b"a red square"}
    write_tar(tmp_path / "good.tar", [good] * 30)
    write_tar(tmp_path / "broken.tar", [{"png": b"not a png", "txt": b"a red square"}] * 70)
    cfg = compose_cfg(
        tmp_path / "run",
        tiny_overrides(tiny_model, str(tmp_path / "*.tar"), 200)
        + ["logger=none", "~callbacks.sample_images", "data.resolution=32"],
    )
    with pytest.raises(BadDataError, match=r"max_bad_data_fraction=0.5 .*broken\.tar"):
        train(cfg)


def test_the_end_summary_names_the_shards_with_the_most_skipped_samples(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    good = {"png": png(32), "txt": b"a red square"}
    write_tar(tmp_path / "good.tar", [good] * 30)
    write_tar(tmp_path / "flaky.tar", [good] * 20 + [{"png": b"not a png", "txt": b"x"}] * 4)
    cfg = compose_cfg(
        tmp_path / "run",
        tiny_overrides(tiny_model, str(tmp_path / "*.tar"), 3)
        + ["logger=none", "~callbacks.sample_images", "data.resolution=32", "data.batch_size=16"],
    )
    caplog.set_level(logging.WARNING, logger="sdtrain.training.module")
    train(cfg)
    lines = [r.getMessage() for r in caplog.records if "most skipped" in r.getMessage()]
    assert len(lines) == 1 and "good.tar" not in lines[0], lines
    assert re.search(r"flaky\.tar \([1-4]\)", lines[0]), lines  # those 3 steps drew
