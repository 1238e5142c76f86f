"""How close a stopped-and-resumed run ends to an uninterrupted one, on this machine's device.

Runs the demo (tiny model, demo shards, data.resampled=false) three times: `steps` straight, and
`steps // 2` then resumed from last.ckpt to `steps`, for each `trainer.deterministic` setting;
prints the largest absolute difference of the U-Net and EMA weights and of Adam's moments as JSON.

    python scripts/resume_tolerance.py --out /tmp/rt --steps 200 -- trainer=gpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def run(folder: Path, steps: int, extra: list[str], resume: bool = False) -> None:
    args = [
        f"hydra.run.dir={folder}",
        f"trainer.max_steps={steps}",
        "data.resampled=false",
        "logger=csv",
        "~callbacks.sample_images",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    if resume:
        args.append("ckpt_path=last")
    subprocess.run([sys.executable, "-m", "sdtrain.cli.train", *args], check=True)


def max_diff(a, b) -> float:
    """Largest absolute difference over the tensors of two nested structures."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        return max((max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        return max((max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("extra", nargs="*", help="overrides for every run (after --)")
    a = p.parse_args()
    results = {}
    for deterministic in (False, True):
        extra = [*a.extra, f"trainer.deterministic={str(deterministic).lower()}"]
        whole, split = a.out / f"whole-{deterministic}", a.out / f"split-{deterministic}"
        run(whole, a.steps, extra)
        run(split, a.steps // 2, extra)
        run(split, a.steps, extra, resume=True)
        x, y = (
            torch.load(f / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for f in (whole, split)
        )
        results[f"deterministic={deterministic}"] = {
            "unet": max_diff(x["state_dict"], y["state_dict"]),
            "ema": max_diff(x["sdtrain"]["ema"]["shadow"], y["sdtrain"]["ema"]["shadow"]),
            "adam": max_diff(x["optimizer_states"], y["optimizer_states"]),
            "unet_max_abs": max(v.abs().max().item() for v in x["state_dict"].values()),
            "steps": [x["global_step"], y["global_step"]],
        }
    print(json.dumps(results, indent=1))
    (a.out / "resume_tolerance.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
