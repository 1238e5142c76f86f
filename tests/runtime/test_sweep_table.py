"""A multirun ends with a table of its runs: overrides and the metric each train() returned."""

from __future__ import annotations

import re
from pathlib import Path

from sdtrain.runtime.sweep_table import table
from tests.conftest import tiny_overrides
from tests.test_train import _cli


def test_table_names_shared_overrides_once():
    rows = [("0", "0.5", ["a=1", "lr=1"]), ("1", "failed: ValueError", ["a=1", "lr=3"])]
    assert table(rows, "train/loss", Path("/s")).splitlines() == [
        "multirun /s: 2 runs, train/loss as train() returned it",
        "  every run: a=1",
        "  #          train/loss  overrides",
        "  0                 0.5  lr=1",
        "  1  failed: ValueError  lr=3",
    ]


def test_a_two_point_multirun_prints_its_table(tiny_model: Path, shards: str, tmp_path: Path):
    keep = [o for o in tiny_overrides(tiny_model, shards, 2) if not o.startswith("callbacks.")]
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *keep,
        "model.optimizer.lr=1e-3,3e-3",
        "optimized_metric=train/loss",  # no held-out data here for the default val/loss_ema
        "callbacks=[progress_log]",  # each run's summary: its loss, to compare with the table
        "logger=none",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    start = lines.index(f"multirun {sweep}: 2 runs, train/loss as train() returned it")
    assert (
        lines[start + 1].startswith("  every run: ") and "trainer.max_steps=2" in lines[start + 1]
    )
    assert lines[start + 2].split() == ["#", "train/loss", "overrides"]
    rows = [line.split() for line in lines[start + 3 : start + 5]]
    assert [(r[0], r[2:]) for r in rows] == [
        ("0", ["model.optimizer.lr=0.001"]),
        ("1", ["model.optimizer.lr=0.003"]),
    ]
    for num, metric, _ in rows:  # the metric each run returned: its final loss
        done = re.search(
            r"finished at step 2/2: .*; loss (\S+)", (sweep / num / "train.log").read_text()
        )
        assert abs(float(metric) - float(done[1])) <= 5e-5  # shown to 4 decimals
    assert (sweep / "runs.txt").read_text().splitlines() == lines[start : start + 5]
