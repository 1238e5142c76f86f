"""scripts/gpu_calls.sh, the pending GPU measurements as named calls: it parses, refuses an unknown
call by name, and (slow) its steps run end to end at toy sizes on the CPU (TINY=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_calls.sh"


# each call's rows, by the GPUs (toy runs: CPU processes) each used
GPUS_PER_ROW = {"speed": [1, 1], "graphs": [1, 1], "sdxl": [1, 1, 1], "ddp": [1, 2], "fsdp": [1, 2],
                "sdxl_multi": [1, 2, 2]}  # fmt: skip


def _run(call: str, out: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, TINY="1", OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(out / "ind")
    return subprocess.run(["bash", str(SCRIPT), call], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_it_parses_and_names_an_unknown_call(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    done = _run("fast", tmp_path, 60)
    assert done.returncode == 2
    assert "unknown call fast: speed, graphs, graphs_small, sdxl, savers, ddp" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("call", ["speed", "graphs", "sdxl", "ddp", "fsdp", "sdxl_multi"])
def test_a_call_runs_its_steps_at_toy_sizes(call, tmp_path):
    done = _run(call, tmp_path, 1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / f"{call}.json").read_text())
    assert [r["gpus"] for r in rows] == GPUS_PER_ROW[call], [
        (r["variant"], r["gpus"]) for r in rows
    ]
    assert all(r["img_per_s"] > 0 for r in rows)
    if call == "speed":
        assert json.loads((tmp_path / "fusion.json").read_text())["groupnorm_silu"]["forward_fused"]
        assert all(r["warmup_s"] is not None for r in rows)  # the first step's time was read
    if call == "graphs":  # compiled; on the CPU the graphs fall back, and the run says why
        logs = "".join(f.read_text() for f in (tmp_path / "logs").glob("*.log"))
        assert "model.cuda_graphs: ordinary launches (device cpu" in logs
    if call in ("fsdp", "sdxl_multi"):
        assert rows[-1]["strategy"] == "fsdp"


@pytest.mark.slow
def test_the_curves_call_compares_one_and_two_processes(tmp_path):
    done = _run("sdxl_curves", tmp_path, 1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "sdxl-curves.json").read_text())
    assert result["family"] == "sdxl"
    assert list(result["losses"]) == ["1xsingle:42", "1xsingle:43", "2xddp:42", "2xfsdp:42"]
    assert all(len(v) == 6 for v in result["losses"].values())
    assert result["seed_band"] is not None and (tmp_path / "sdxl-curves.png").is_file()
