"""The two trainers of the parity harness (scripts/parity.py), at one budget.

The reference loop (`scripts/reference_loop.py`) trains in this process in strict fp32; sdtrain
trains in a subprocess, `python -m sdtrain.cli.train` with Hydra overrides, as a user trains their
own shards (any sdtrain checkout: --sdtrain-root, or a variant's root=DIR), and is exported raw
and EMA. Each leaves diffusers folders for the judges.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__:  # imported as scripts.parity_trainers (tests)
    from scripts.reference_loop import save, train_reference
else:  # run from scripts/ (python scripts/parity.py)
    from reference_loop import save, train_reference

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32  # px: the tasks' images, as both trainers and the judges see them
T0 = time.perf_counter()


def say(msg: str) -> None:
    """The harness's log line: seconds since it started, then `msg`."""
    print(f"[parity {time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def run_reference(
    a: argparse.Namespace, model: Path, images: list, captions: list[str], seed: int, out: Path
):
    """Train with the reference loop (fp32; no TF32 on CUDA) and save a diffusers folder."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the reference is the yardstick
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    unet = train_reference(
        model, images, captions, a.steps, a.batch_size, a.lr, a.caption_dropout, seed, a.device
    )
    secs = time.perf_counter() - t0
    folder = save(model, unet, out / "reference")
    say(f"reference seed {seed}: trained in {secs:.0f} s -> {folder}")
    return folder, secs


def sdtrain_root(a: argparse.Namespace, extra: list[str] = ()) -> Path:
    """The sdtrain checkout to measure: a variant's root=DIR, else --sdtrain-root, else the one
    this script lives in."""
    roots = [Path(v.removeprefix("root=")) for v in extra if v.startswith("root=")]
    return (roots[-1] if roots else a.sdtrain_root or ROOT).resolve()


def sdtrain_overrides(a: argparse.Namespace, model: Path, shards: str, seed: int, run: Path):
    """Hydra overrides for `python -m sdtrain.train`: the same budget as the reference."""
    cuda = a.device.startswith("cuda")
    callbacks = (sdtrain_root(a) / "conf/callbacks/default.yaml").read_text()
    # An older checkout may lack a callback, and deleting a missing key is a Hydra error.
    gone = () if a.keep_callbacks else ("sample_images", "throughput")
    drop = [f"~callbacks.{c}" for c in gone if c in callbacks]
    return [
        f"model.pretrained={model}",
        # your own shards, as a user trains them: not the demo's data group, whose flips (its
        # shapes are mirror-symmetric) and validation shapes stay on under a new train_shards
        "data=webdataset",
        "data.random_flip=false",  # a mirrored letter is another class (or none)
        f"data.train_shards='{shards}'",  # one argv element; quoted for Hydra's braces
        f"data.resolution={RESOLUTION}",
        f"data.batch_size={a.batch_size}",
        f"data.num_workers={8 if cuda else 1}",
        f"trainer.max_steps={a.steps}",
        f"model.optimizer.lr={a.lr}",
        f"model.caption_dropout={a.caption_dropout}",
        "model.lr_scheduler.name=constant",
        "model.lr_scheduler.num_warmup_steps=0",
        f"seed={seed}",
        "logger=none",
        *drop,  # keep ema and model_checkpoint
        "trainer=gpu" if cuda else "trainer=cpu",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run}",
        *a.sdtrain_override,
    ]


def run_sdtrain(a, model: Path, shards: str, seed: int, out: Path, name: str, extra: list[str]):
    """Train with sdtrain in a subprocess (variant `name`: `extra` overrides last), export raw and
    EMA folders; return them and the time."""
    root = sdtrain_root(a, extra)
    extra = [v for v in extra if not v.startswith("root=")]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    run = out / f"{name}-run"
    run.mkdir(parents=True, exist_ok=True)
    overrides = [*sdtrain_overrides(a, model, shards, seed, run), *extra]
    cmd = [sys.executable, "-m", "sdtrain.cli.train", *overrides]
    say(f"{name} seed {seed} ({root}): {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    call(cmd, root, env, run / "train.out")
    secs = time.perf_counter() - t0
    ckpt = run / "checkpoints" / "last.ckpt"
    raw, ema = out / f"{name}-raw", out / f"{name}-ema"
    call(
        [sys.executable, "-m", "sdtrain.cli.export", str(ckpt), str(raw), "--no-ema"],
        root,
        env,
    )
    call([sys.executable, "-m", "sdtrain.cli.export", str(ckpt), str(ema)], root, env)
    say(f"{name} seed {seed}: trained in {secs:.0f} s (subprocess, start-up included)")
    return raw, ema, secs


def call(cmd: list[str], cwd: Path, env: dict, log: Path | None = None) -> None:
    """Run `cmd`; on failure show the end of its output and stop the harness."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"parity: {' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
