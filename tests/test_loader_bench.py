"""scripts/loader_bench.py on tiny sizes: photo-like image shards and an SDXL latent cache made,
served over HTTP and moto's S3 server, read through the train dataloader built from conf/."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PX = 64  # both families' images at 64 px: SD's and SDXL's VAEs give (8, 8, 8) moments
BATCH, BATCHES = 2, 3  # timed batches: at least 3 a worker


def test_loader_bench_reads_each_kind_from_each_source(tmp_path: Path):
    out = tmp_path / "bench.json"
    argv = ["--work", str(tmp_path / "work"), "--px", str(PX), "--px-xl", str(PX)]
    argv += ["--kinds", "images-sd", "latents-sdxl", "--workers", "1", "--samples", "8"]
    argv += ["--per-shard", "4", "--batch-size", str(BATCH), "--warmup", "2"]
    argv += ["--batches", str(BATCHES), "--min-seconds", "0", "--shuffle-buffer", "4"]
    argv += ["--json", str(out)]
    script = ROOT / "scripts" / "loader_bench.py"
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "| images-sd | 64 | http | 1 |" in proc.stdout  # the table

    rows = {(r["kind"], r["source"]): r for r in result["rows"]}
    assert sorted(rows) == sorted(
        (k, s) for k in ("images-sd", "latents-sdxl") for s in ("local", "http", "s3")
    )
    for (kind, source), r in rows.items():
        assert r["url"].startswith(
            {"local": "/", "http": "http://127.0.0.1:", "s3": "s3://"}[source]
        )
        assert r["samples"] == BATCH * BATCHES and r["samples_per_s"] > 0
        if kind == "images-sd":  # decoded and cropped to data.resolution: (B, 3, H, W)
            assert r["shape"] == [BATCH, 3, PX, PX]
            assert r["kb_per_sample"] * 1024 > 1000  # a textured JPEG, not a flat one
        else:  # latent moments: mean and log-variance of 4 channels, 8x down (B, 8, H/8, W/8)
            assert r["shape"] == [BATCH, 8, PX // 8, PX // 8]
            # SDXL's context (77, 2048) fp16 in each sample, as the released encoders give
            assert r["kb_per_sample"] * 1024 > 77 * 2048 * 2
    assert len(result["workers_needed"]) == len(rows)
    for need in result["workers_needed"]:  # SD at 150 images/s, SDXL at 15
        rate = {"images-sd": 150, "latents-sdxl": 15}[need["kind"]]
        row = rows[(need["kind"], need["source"])]
        assert row["per_core"] > 0 and need["gpu_rate"] == rate
        assert need["workers"] == math.ceil(rate / row["per_core"])
        assert need["workers_here"] == math.ceil(rate / row["per_worker"])
