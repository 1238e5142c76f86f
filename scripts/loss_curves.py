"""Loss over the first steps on 1 GPU, DDP and FSDP at the same global batch and seed.

    python scripts/loss_curves.py --work /tmp/bw --px 256 --global-batch 32 --steps 200 \
        --runs 1xsingle:42 1xsingle:43 4xddp:42 4xfsdp:42 --out docs/scale/loss-curves

Each run is `sdtrain.cli.train` on the random model of the released shapes (`--family sd`:
SD-1.5's, `sdxl`: SDXL's) and the latent cache that scripts/benchmark.py builds (same --work),
logging train/loss every step; `--extra` adds an override to every run (e.g.
model.gradient_checkpointing=true, or trainer.accelerator=cpu for a `--tiny` dry run). A run is
GPUSxSTRATEGY:SEED. The processes draw their noise and timesteps by rank (sdtrain's rule), so runs
on different GPU counts see different draws: they agree when their curves differ no more than two
seeds on one GPU do. Writes OUT.json (per-step losses, 20-step window means, the largest window
difference to the first run, and the seed band) and OUT.png (20-step window means, one colour
per run).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import build_latent_cache, build_shaped  # noqa: E402

COLOURS = [(20, 60, 160), (200, 60, 30), (30, 150, 60), (150, 40, 170), (120, 120, 120)]


def run(a: argparse.Namespace, spec: str, folder: Path, cache: Path) -> list[float]:
    """One training run; its per-step train/loss."""
    par, _, seed = spec.partition(":")
    gpus, strategy = par.split("x")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "sdtrain.cli.train", "model=finetune"]
        cmd += [f"model.pretrained={folder}", "data=latents", f"data.train_shards={cache}"]
        cmd += [f"data.global_batch_size={a.global_batch}", "data.num_workers=4"]
        cmd += [f"data.max_batch_size_per_device={a.global_batch}"]
        cmd += ["trainer=gpu" if strategy == "single" else f"trainer={strategy}"]
        cmd += [f"trainer.devices={gpus}", "trainer.precision=bf16-mixed"]
        cmd += [f"trainer.max_steps={a.steps}", "trainer.log_every_n_steps=1"]
        cmd += ["trainer.enable_progress_bar=false", "logger=csv", "~callbacks.sample_images"]
        cmd += ["~callbacks.model_checkpoint", "+trainer.enable_checkpointing=false"]
        cmd += [f"seed={seed or 42}", f"model.optimizer.lr={a.lr}", "+model.optimizer.fused=true"]
        cmd += ["model.lr_scheduler.num_warmup_steps=20", f"hydra.run.dir={out}", *a.extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"{spec}: {time.perf_counter() - t0:.0f} s", flush=True)
        rows = list(csv.DictReader(open(next(Path(out).glob("csv/*/metrics.csv")))))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    return [losses[s] for s in sorted(losses)]


def from_log(path: Path, names: list[str]) -> dict[str, list[float]]:
    """Per-step losses from the runs' progress lines (`step N/M  loss X`), in run order: a run
    starts where the step count goes back to 1. A run cut off early keeps the steps it logged."""
    runs: list[list[float]] = []
    for line in path.read_text().splitlines():
        m = re.search(r"step (\d+)/\d+\s+loss ([0-9.]+)", line)
        if m:
            if int(m.group(1)) == 1:
                runs.append([])
            runs[-1].append(float(m.group(2)))
    return dict(zip(names, runs, strict=False))


def windows(values: list[float], size: int) -> list[float]:
    return [statistics.fmean(values[i : i + size]) for i in range(0, len(values) - size + 1, size)]


def plot(curves: dict[str, list[float]], size: int, path: Path) -> None:
    from PIL import Image, ImageDraw

    from sdtrain.artifacts.sampling import font
    from sdtrain.callbacks.report import PANEL_H, PANEL_W, panel

    canvas = Image.new("RGB", (PANEL_W, PANEL_H + 20 * len(curves)), "white")
    draw = ImageDraw.Draw(canvas)
    means = {k: windows(v, size) for k, v in curves.items()}
    n = max(len(m) for m in means.values())
    steps = [size * (i + 1) for i in range(n)]
    lines = [(m, COLOURS[i % len(COLOURS)]) for i, m in enumerate(means.values()) if len(m) == n]
    panel(draw, 0, f"train/loss, {size}-step means", steps, lines)
    for i, name in enumerate(curves):
        cut = "" if len(means[name]) == n else f" (cut off at step {len(curves[name])}, not drawn)"
        draw.text((70, PANEL_H + 20 * i), name + cut, fill=COLOURS[i % len(COLOURS)], font=font())
    canvas.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", help="model and caches (shared with benchmark.py)")
    p.add_argument("--px", type=int, default=256)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--runs", nargs="+", default=["1xsingle:42", "1xsingle:43", "2xddp:42"])
    p.add_argument("--out", required=True, help="path stem: OUT.json and OUT.png")
    p.add_argument("--from-log", help="rebuild from a log of these runs' progress lines instead")
    p.add_argument("--family", default="sd", choices=["sd", "sdxl"], help="the model's shapes")
    p.add_argument("--tiny", action="store_true", help="toy widths: a CPU dry run of the script")
    p.add_argument("--extra", action="append", default=[], help="an override for every run")
    a = p.parse_args()
    if a.from_log:
        curves = from_log(Path(a.from_log), a.runs)
    else:
        work = Path(a.work)
        folder = work / (f"{a.family}-shaped" + ("-tiny" if a.tiny else ""))
        if not (folder / "model_index.json").is_file():  # the folder benchmark.py builds
            build_shaped(a.family, folder, a.tiny)
        cache = build_latent_cache(folder, work, a.px, a.images)
        curves = {spec: run(a, spec, folder, cache) for spec in a.runs}
    ref = next(iter(curves))
    means = {k: windows(v, a.window) for k, v in curves.items()}
    diff = {
        k: max(abs(x - y) for x, y in zip(m, means[ref], strict=False)) for k, m in means.items()
    }
    singles = [k for k in curves if "single" in k]
    band = diff[singles[1]] if len(singles) > 1 and singles[0] == ref else None
    result = {
        "family": a.family,
        "px": a.px,
        "global_batch": a.global_batch,
        "steps": a.steps,
        "lr": a.lr,
        "window": a.window,
        "reference": ref,
        "window_means": means,
        "max_window_diff_to_reference": diff,
        "seed_band": band,
        "losses": curves,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(curves, a.window, out.with_suffix(".png"))
    for k, d in diff.items():
        print(f"{k:<14} last window {means[k][-1]:.4f}  max |window diff| to {ref}: {d:.4f}")
    print(f"seed band (two seeds, 1 GPU): {band}")


if __name__ == "__main__":
    main()
