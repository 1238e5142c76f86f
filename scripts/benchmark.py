"""Training throughput on one GPU: a plain loop and the full sdtrain run, side by side in one run.

    python scripts/benchmark.py --cases 512x32 256x64 --out docs/benchmarks.json

Variants, one process each (so one variant's compile caches and memory never help another):
  raw_eager_onthefly  the plain loop diffusers' example runs: VAE + CLIP every step, eager U-Net,
                      bf16 autocast, AdamW (foreach), grad clipping.
  raw_fast_cached     the same loop on cached latent moments and text contexts held on the GPU,
                      with the fast settings: compiled U-Net (`--compile`), channels-last, fused
                      AdamW, TF32, cuDNN autotuning. The ceiling for this model and card.
  pipeline            the full sdtrain run (`sdtrain.cli.train`): Lightning Trainer, the datamodule
                      reading latent shards (made by sdtrain-cache-latents) from disk, EMA, grad
                      clipping, CSV logging, the same fast settings. Throughput, MFU, data wait and
                      memory come from its own monitor (sdtrain.callbacks.throughput).
                      With --serve-http the latent shards come over HTTP instead: Python's
                      http.server on this machine serves them (a subprocess of this script).

The model is random with SD-1.5's shapes (U-Net 860 M, VAE, CLIP ViT-L/14), built once (no
download). MFU = U-Net training FLOPs per image (counted with torch's FlopCounterMode) x img/s over
the card's dense bf16 peak. Rows are appended to `--out` (JSON list); a table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from bench_shards import http_server, shard_url  # scripts/ is on the path: runs as a script
from shaped_models import build_shaped

from sdtrain.models.speed import environment_alloc_conf

VARIANTS = ("raw_eager_onthefly", "raw_fast_cached", "pipeline")
CUDA = torch.cuda.is_available()


def build_sd15_shaped(out: Path) -> Path:
    """A random model with SD-1.5's U-Net, VAE and CLIP ViT-L/14 text encoder shapes."""
    return build_shaped("sd", out)


def build_latent_cache(folder: Path, work: Path, px: int, count: int) -> Path:
    """Image shards of `count` demo images at `px`, then sdtrain-cache-latents over them (GPU)."""
    from sdtrain.cli.shards import main as shards_main
    from sdtrain.demo import shapes as demo

    out = work / f"latents-{folder.name}-{px}"
    if (out / "cache.json").is_file():
        return out
    demo.write_folder(work / f"images-{px}", count, px)
    shards_main(
        [str(work / f"images-{px}"), str(work / f"shards-{px}"), "--samples-per-shard", "256"]
    )
    cmd = [sys.executable, "-m", "sdtrain.cli.cache_latents", str(work / f"shards-{px}"), str(out)]
    batch = str(max(1, 32 * 512**2 // px**2))  # the VAE encodes 1024 px in fp32 for SDXL
    cmd += ["--pretrained", str(folder), "--resolution", str(px), "--text", "--batch-size", batch]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"latent cache {px} px: {count} images in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# ---------------------------------------------------------------------------- the pipeline


FIRST_STEP = re.compile(r"first step done in (?:(\d+)h(\d+)m|(\d+)m(\d+)s|([\d.]+)s)")


def first_step_seconds(line: str) -> float | None:
    """The seconds of sdtrain-train's "first step done in 4m05s" progress line (None if not it)."""
    m = FIRST_STEP.search(line)
    if m is None:
        return None
    h, hm, mm, ms, sec = m.groups()
    if h is not None:
        return int(h) * 3600 + int(hm) * 60
    return float(sec) if sec is not None else int(mm) * 60 + int(ms)


def run_echoed(cmd: list[str]) -> float | None:
    """Run `cmd`, its output echoed as it comes; returns its first step's seconds."""
    first = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            first = first if first is not None else first_step_seconds(line)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return first


def pipeline(a: argparse.Namespace) -> dict:
    """The full `sdtrain-train` run on the latent cache; numbers from its throughput monitor."""
    with tempfile.TemporaryDirectory() as run:
        cmd = [
            sys.executable,
            "-m",
            "sdtrain.cli.train",
            "model=finetune",
            f"model.pretrained={a.folder}",
            "data=latents",
            f"data.train_shards='{a.cache}'",  # quoted: an http:// brace pattern
            f"data.batch_size={a.batch}",
            f"data.num_workers={a.workers}",
            ("trainer=gpu" if CUDA else "trainer=cpu") if a.gpus == 1 else f"trainer={a.strategy}",
            "trainer.precision=bf16-mixed",  # explicit: every variant in bf16 autocast
            f"trainer.devices={a.gpus}",
            f"trainer.max_steps={a.warmup + a.steps}",
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=5",
            "logger=csv",
            "~callbacks.sample_images",
            "~callbacks.model_checkpoint",
            "+trainer.enable_checkpointing=false",
            f"model.compile={a.compile or 'null'}",
            f"model.fsdp_reduce_dtype={a.reduce_dtype}",
            f"model.fsdp_param_dtype={a.param_dtype or 'null'}",
            f"model.channels_last={str(a.channels_last).lower()}",
            f"+model.optimizer.fused={str(CUDA).lower()}",
            f"trainer.benchmark={str(CUDA).lower()}",
            "callbacks.throughput.window=5",
            f"hydra.run.dir={run}",
            *a.extra,
        ]
        t0 = time.perf_counter()
        first_step_s = run_echoed(cmd)
        wall = time.perf_counter() - t0
        logs = next(Path(run).glob("csv/*/metrics.csv")).parent
        rows = list(csv.DictReader(open(logs / "metrics.csv")))
        # the config the run logged: sdtrain-train sets the allocator from its cuda_alloc_conf
        hparams = yaml.safe_load((logs / "hparams.yaml").read_text()) or {}

    def col(name: str, after: int) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name) and int(r["step"]) > after]

    warm = a.warmup
    return {
        "img_per_s": statistics.median(col("perf/img_per_s", warm)),
        "flops_per_img": col("perf/flops_per_img", -1)[0],
        "data_wait_frac": statistics.median(col("perf/data_wait_frac", warm)),
        "peak_mem_gb": max(col("perf/peak_mem_gb", -1), default=0.0),
        "state_mem_gb": max(col("perf/state_mem_gb", -1)),
        "alloc_retries": max(col("perf/alloc_retries", -1), default=0),
        "alloc_conf": hparams.get("cuda_alloc_conf"),
        "warmup_s": first_step_s,  # the first step, its compile included (progress line)
        "run_wall_s": wall,
    }


def child(a: argparse.Namespace) -> None:
    from raw_loop import raw_loop  # scripts/ is on the path: this file runs as a script

    from sdtrain.callbacks.throughput import peak_flops_for

    t0 = time.perf_counter()
    r = pipeline(a) if a.child == "pipeline" else raw_loop(a, fast=a.child == "raw_fast_cached")
    gpu = torch.cuda.get_device_name() if CUDA else "cpu"
    peak = peak_flops_for(gpu) if CUDA else None
    row = {
        "gpu": gpu,
        "family": a.family,
        "gpus": a.gpus,
        "px": a.px,
        "batch": a.batch,
        "variant": a.child,
        "img_per_s": round(r["img_per_s"], 1),
        "mfu": round(r["flops_per_img"] * r["img_per_s"] / peak, 3) if peak else None,
        "peak_mem_gb": round(r["peak_mem_gb"], 1),
        "data_wait_frac": round(r["data_wait_frac"], 4),
        "shards_from": ("http" if a.cache.startswith("http") else "disk")
        if a.child == "pipeline"
        else None,
        "strategy": "single" if a.gpus == 1 else a.strategy,
        "channels_last": a.channels_last if a.child == "pipeline" else None,
        "state_mem_gb": round(r["state_mem_gb"], 2) if r.get("state_mem_gb") else None,
        "alloc_retries": int(r.get("alloc_retries", 0)),
        # the environment's wins (as in sdtrain-train), else the pipeline's cuda_alloc_conf
        "alloc_conf": environment_alloc_conf() or r.get("alloc_conf"),
        "compile": None if a.child == "raw_eager_onthefly" else a.compile,
        "tflop_per_img": round(r["flops_per_img"] / 1e12, 3),
        "warmup_s": None if r.get("warmup_s") is None else round(r["warmup_s"], 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "overrides": a.extra or None,
    }
    print("ROW " + json.dumps(row), flush=True)


def run_variant(
    a, spec: str, case: str, folder: Path, cache: Path | str | None, work: Path
) -> dict | None:
    """One variant in its own process; its output goes to a log file; returns its row.

    `spec` is VARIANT[:COMPILE][@GPUSxSTRATEGY][|OVERRIDE...], e.g. pipeline:None@4xfsdp or
    'pipeline:unet|model.attention=cudnn' (overrides for this variant, after --extra's); an
    override `ENV:NAME=VALUE` sets an environment variable of the variant's process instead, e.g.
    'pipeline:repeated|ENV:PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True'."""
    spec, *extra = spec.split("|")
    env = dict(os.environ)
    env.update(x[4:].split("=", 1) for x in extra if x.startswith("ENV:"))
    label = "-".join(x.rpartition(".")[2].rpartition(":")[2] for x in extra)
    extra = [x for x in extra if not x.startswith("ENV:")]
    spec, _, par = spec.partition("@")
    gpus, strategy = par.split("x") if par else (str(a.gpus), a.strategy)
    v, _, comp = spec.partition(":")
    comp = comp or str(a.compile)
    px, bs = case.split("x")
    cmd = [
        sys.executable,
        __file__,
        "--child",
        v,
        "--px",
        px,
        "--batch",
        bs,
        "--folder",
        str(folder),
    ]
    cmd += ["--cache", str(cache), "--compile", comp, "--steps", str(a.steps)]
    cmd += ["--warmup", str(a.warmup), "--workers", str(a.workers)]
    cmd += ["--gpus", gpus, "--strategy", strategy, "--reduce-dtype", a.reduce_dtype]
    cmd += ["--param-dtype", str(a.param_dtype), "--family", a.family]
    cmd += ["--channels-last" if a.channels_last else "--no-channels-last"]
    cmd += [f"--extra={x}" for x in [*a.extra, *extra]]
    name = f"{v}-{comp}-{gpus}x{strategy}-{case}" + (f"-{label}" if label else "")
    log_file = (
        Path(a.logs or work)
        / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)}.log"
    )
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        # own process group: a timed-out pipeline's training process must not outlive it
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        try:
            proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"{spec} {case}: timed out after {a.timeout} s (log: {log_file})", flush=True)
            return None
    text = log_file.read_text()
    found = [json.loads(line[4:]) for line in text.splitlines() if line.startswith("ROW ")]
    if not found:
        print(f"{spec} {case}: failed (log: {log_file})\n{text[-3000:]}", flush=True)
        return None
    return found[0]


def run_case(a, case: str, folder: Path, work: Path, base: str | None) -> list[dict]:
    """Every variant at `case` (PXxBATCH); the pipeline's latent shards from `base` (an HTTP
    server of `work`) when given, else from disk."""
    px, rows = int(case.split("x")[0]), []
    wants_cache = any(v.startswith("pipeline") for v in a.variants)
    cache = build_latent_cache(folder, work, px, a.images) if wants_cache else None
    if cache is not None and base is not None:
        cache = shard_url(cache, work, "http", base)
    for spec in a.variants:
        row = run_variant(a, spec, case, folder, cache, work)
        if row is None:
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            old = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else []
            Path(a.out).write_text(json.dumps(old + [row], indent=1) + "\n")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["512x32", "256x64"], help="PXxBATCH")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help="VARIANT[:COMPILE][@GPUSxSTRATEGY][|OVERRIDE...] each, e.g. pipeline:None@4xfsdp",
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (compile)")
    p.add_argument("--compile", default="unet", help="unet, blocks or None (fast variants)")
    p.add_argument("--workers", type=int, default=6, help="pipeline DataLoader workers")
    p.add_argument("--images", type=int, default=1024, help="images in the latent cache")
    p.add_argument("--work", help="folder for the model and caches (default: a temp folder)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per variant")
    p.add_argument("--out", help="JSON list to append the rows to")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for the pipeline variant")
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="pipeline"
    )
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="with --gpus > 1")
    p.add_argument("--reduce-dtype", default="float32", help="fsdp: gradient reduce dtype")
    p.add_argument("--param-dtype", default=None, help="fsdp: bfloat16, or None (autocast)")
    p.add_argument(
        "--extra", action="append", default=[], help="an sdtrain-train override (pipeline)"
    )
    p.add_argument("--logs", help="folder for each variant's log (default: --work)")
    p.add_argument("--family", default="sd", choices=["sd", "sdxl"], help="the model's shapes")
    p.add_argument("--tiny", action="store_true", help="toy widths: a CPU dry run of the script")
    p.add_argument(
        "--serve-http", action="store_true", help="pipeline: latent shards over HTTP (localhost)"
    )
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--px", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.compile == "None":
        a.compile = None
    if a.param_dtype == "None":
        a.param_dtype = None
    if a.child:
        return child(a)
    work = Path(a.work or tempfile.mkdtemp(prefix="sdtrain-bench-"))
    folder = work / (f"{a.family}-shaped" + ("-tiny" if a.tiny else ""))
    if not (folder / "model_index.json").is_file():
        t0 = time.perf_counter()
        build_shaped(a.family, folder, a.tiny)
        gc.collect()
        torch.cuda.empty_cache()  # built on the GPU: give its memory back to the variants
        print(f"built {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(http_server(work)) if a.serve_http else None
        for case in a.cases:
            rows += run_case(a, case, folder, work, base)
    print(
        f"\n{'variant':<20} {'compile':>7} {'gpus':>4} {'strategy':>8} {'px':>4} {'batch':>5} "
        f"{'img/s':>7} {'MFU':>6} {'wait':>6} {'GB':>5} {'stateGB':>7} {'shards':>6}  gpu"
    )
    for r in rows:
        print(
            f"{r['variant']:<20} {str(r['compile']):>7} {r['gpus']:>4} {r['strategy']:>8} "
            f"{r['px']:>4} {r['batch']:>5} {r['img_per_s']:>7} {r['mfu'] or '-':>6} "
            f"{r['data_wait_frac']:>6} {r['peak_mem_gb']:>5} {r.get('state_mem_gb') or '-':>7} "
            f"{r.get('shards_from') or '-':>6}  "
            f"{r['gpu']}"
        )


if __name__ == "__main__":
    main()
