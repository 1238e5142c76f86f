"""scripts/masked_learning.py: a floor-0 mask leaves the masked-out half of the images unlearned
while the masked-in half learns as without masks (two real 60-step runs of the tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import masked_learning


@pytest.mark.slow  # ~90 s on a 2-core CPU: two 60-step runs
def test_a_floor_zero_mask_leaves_the_masked_out_half_unlearned(tiny_model: Path, tmp_path: Path):
    argv = ["--model", str(tiny_model), "--out", str(tmp_path), "--steps", "60"]
    r = masked_learning.main([*argv, "--json", str(tmp_path / "table.json")])
    plain, masked = r["unmasked"], r["masked, floor 0"]
    assert plain["in_before"] == masked["in_before"] and plain["out_before"] == masked["out_before"]
    # the masked-in half learns as without masks ...
    assert masked["in"] < 0.5 * masked["in_before"]
    assert masked["in"] == pytest.approx(plain["in"], rel=0.15)
    # ... the masked-out half only without them
    assert plain["out"] < 0.8 * plain["out_before"]
    assert masked["out"] > 0.9 * masked["out_before"]
    assert (tmp_path / "table.json").is_file()
