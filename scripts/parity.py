"""Learning parity, measured: sdtrain against a minimal reference loop, judged by prompt accuracy.

One tiny Stable Diffusion (sdtrain.tiny) learns the demo's 12 captioned classes ("a red circle", 4
colours x 3 shapes) twice at the same budget: with `scripts/reference_loop.py` (plain diffusers +
torch, fp32) and with `python -m sdtrain.train` (a subprocess, as users run it: bf16-mixed on a GPU).
Each trained model generates K images per prompt (DDIM, 25 steps, guidance 8, fixed seeds) and a
small CNN fitted on real renders names each image's class: prompt accuracy is the fraction named as
the prompt's class (chance: 1/12); colour and shape accuracy are reported apart.

From the repo root, in the project's environment (`pip install -e .`).

CPU smoke run (~6 min on an idle 2-core CPU, 9-20 min on a busy one; the slow test runs this size):
    python scripts/parity.py --out /tmp/parity-cpu --steps 300 --batch-size 32 --n-train 1200 --per-class 4

GPU (H100/H200; sdtrain in bf16-mixed with 8 loader workers, the reference in strict fp32):
    python scripts/parity.py --out parity-gpu --steps 2000 --batch-size 128 --seeds 0 1 2

Another checkout of sdtrain (an older commit, in a git worktree), with the same harness:
    git worktree add /tmp/sdtrain-old <commit>
    python scripts/parity.py --out parity-old --sdtrain-root /tmp/sdtrain-old --steps 2000 --batch-size 128

An experiment on sdtrain's side only (repeatable, any Hydra override):
    python scripts/parity.py --out parity-noclip --sdtrain-override trainer.gradient_clip_val=null

Writes OUT/parity.json and prints a markdown table (per seed and mean). The data set, the model and
the judge are shared across seeds; only the training seed differs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdtrain import demo

if __package__:  # imported as scripts.parity (tests)
    from scripts.reference_loop import save, to_pixels, train_reference
else:  # run as python scripts/parity.py
    from reference_loop import save, to_pixels, train_reference

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [(c, s) for c in demo.COLOURS for s in demo.SHAPES]  # demo.samples' order: i % 12
RESOLUTION = 32
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[parity {time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def caption(label: int) -> str:
    colour, shape = CLASSES[label]
    return f"a {colour} {shape}"


# ---- data ------------------------------------------------------------------------------------


def render_set(n: int, seed: int) -> tuple[list, torch.Tensor]:
    """`n` demo renders (PIL) cycling through the 12 classes, and their labels (n,)."""
    images = [img for img, _ in demo.samples(n, RESOLUTION, seed=seed)]
    return images, torch.arange(n) % len(CLASSES)


def write_shards(images: list, labels: torch.Tensor, out: Path, n_shards: int) -> str:
    """Write the images as a captioned folder, then as `n_shards` shards; return the brace pattern."""
    from sdtrain.shards import write_shards as shard_folder

    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        img.save(folder / f"{i:05d}.png")  # PNG: the shards hold exactly the in-memory pixels
        (folder / f"{i:05d}.txt").write_text(caption(label))
    per_shard = math.ceil(len(images) / n_shards)
    shards = shard_folder(folder, out / "shards", samples_per_shard=per_shard)
    return f"{out / 'shards'}/{{00000..{len(shards) - 1:05d}}}.tar"


# ---- judge -----------------------------------------------------------------------------------


class Judge(nn.Module):
    """A small CNN: (B, 3, 32, 32) RGB in [0, 1] -> (B, 12) class logits."""

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:  # halves H and W
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 64))  # (B, 64, 4, 4)
        self.head = nn.Linear(64 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).flatten(1))


def to_unit(images: list) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float in [0, 1] (the judge's input)."""
    return (to_pixels(images) + 1) / 2


def train_judge(
    n_train: int, n_test: int, device: str, epochs: int = 12
) -> tuple[Judge, dict[str, float]]:
    """Fit the judge on real renders (seed 1) and score it on held-out renders (seed 2)."""
    torch.manual_seed(0)
    images, labels = render_set(n_train, seed=1)
    x, y = to_unit(images).to(device), labels.to(device)
    judge = Judge().to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * (n_train // 64))
    for _ in range(epochs):
        perm = torch.randperm(n_train, device=device)
        for i in range(0, n_train - 63, 64):
            xb, yb = x[perm[i : i + 64]], y[perm[i : i + 64]]
            # Pixel noise of random strength: generated images are never as clean as renders.
            xb = xb + torch.randn_like(xb) * 0.08 * torch.rand(len(xb), 1, 1, 1, device=device)
            loss = nn.functional.cross_entropy(judge(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    judge.eval()
    test_images, test_labels = render_set(n_test, seed=2)
    return judge, score(judge, to_unit(test_images), test_labels)


@torch.no_grad()
def score(judge: Judge, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy of the judge's class (and of its colour and shape alone) against `labels`."""
    dev = next(judge.parameters()).device
    pred = torch.cat([judge(xb.to(dev)).argmax(1).cpu() for xb in x.split(256)])
    n_shapes = len(demo.SHAPES)
    return {
        "accuracy": (pred == labels).float().mean().item(),
        "colour": (pred // n_shapes == labels // n_shapes).float().mean().item(),
        "shape": (pred % n_shapes == labels % n_shapes).float().mean().item(),
    }


@torch.no_grad()
def vae_roundtrip_score(judge: Judge, model_dir: Path, n: int, device: str) -> dict[str, float]:
    """The judge on held-out renders passed through the model's VAE: the best a model can get."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device).eval()
    images, labels = render_set(n, seed=2)
    x = to_pixels(images).to(device)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return score(judge, ((rec + 1) / 2).clamp(0, 1).cpu(), labels)


# ---- generation and judging ------------------------------------------------------------------


@torch.no_grad()
def generate(folder: Path, per_class: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` images per prompt from the diffusers folder, (N, 3, 32, 32) in [0, 1], labels."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)  # (N,) class by class
    images = pipe(
        [caption(label) for label in labels.tolist()],
        num_inference_steps=25,
        guidance_scale=8.0,
        height=RESOLUTION,
        width=RESOLUTION,
        # CPU generators: image i starts from the same noise for every model, on every device.
        generator=[torch.Generator().manual_seed(i) for i in range(len(labels))],
        output_type="np",
    ).images  # (N, H, W, 3) in [0, 1]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float(), labels


def judge_folder(folder: Path, judge: Judge, per_class: int, device: str) -> dict[str, float]:
    t0 = time.perf_counter()
    x, labels = generate(folder, per_class, device)
    result = score(judge, x, labels)
    save_grid(x, per_class, folder / "samples.png")
    say(f"judged {folder.name}: {fmt(result)} ({time.perf_counter() - t0:.0f} s)")
    return result


def save_grid(x: torch.Tensor, per_class: int, path: Path) -> None:
    """One row per class, `per_class` images across: to look at what the numbers mean."""
    from PIL import Image

    rows = x.view(len(CLASSES), per_class, 3, RESOLUTION, RESOLUTION)
    grid = rows.permute(0, 3, 1, 4, 2).reshape(len(CLASSES) * RESOLUTION, -1, 3)
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save(path)


# ---- the two trainers ------------------------------------------------------------------------


def run_reference(a: argparse.Namespace, model: Path, images: list, labels, seed: int, out: Path):
    """Train with the reference loop (fp32; no TF32 on CUDA) and save a diffusers folder."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the reference is the yardstick
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    captions = [caption(label) for label in labels.tolist()]
    unet = train_reference(
        model, images, captions, a.steps, a.batch_size, a.lr, a.caption_dropout, seed, a.device
    )
    secs = time.perf_counter() - t0
    folder = save(model, unet, out / "reference")
    say(f"reference seed {seed}: trained in {secs:.0f} s -> {folder}")
    return folder, secs


def sdtrain_root(a: argparse.Namespace) -> Path:
    """The sdtrain checkout to measure: --sdtrain-root, else the one this script lives in."""
    return (a.sdtrain_root or ROOT).resolve()


def sdtrain_overrides(a: argparse.Namespace, model: Path, shards: str, seed: int, run: Path):
    """Hydra overrides for `python -m sdtrain.train`: the same budget as the reference."""
    cuda = a.device.startswith("cuda")
    callbacks = (sdtrain_root(a) / "conf/callbacks/default.yaml").read_text()
    # An older checkout may lack a callback, and deleting a missing key is a Hydra error.
    drop = [f"~callbacks.{c}" for c in ("sample_images", "throughput") if c in callbacks]
    return [
        f"model.pretrained={model}",
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


def run_sdtrain(a: argparse.Namespace, model: Path, shards: str, seed: int, out: Path):
    """Train with sdtrain in a subprocess, export raw and EMA folders; return them and the time."""
    root = sdtrain_root(a)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    run = out / "sdtrain-run"
    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "sdtrain.train", *sdtrain_overrides(a, model, shards, seed, run)]
    say(f"sdtrain seed {seed} ({root}): {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    call(cmd, root, env, run / "train.out")
    secs = time.perf_counter() - t0
    ckpt = run / "checkpoints" / "last.ckpt"
    raw, ema = out / "sdtrain-raw", out / "sdtrain-ema"
    call([sys.executable, "-m", "sdtrain.export", str(ckpt), str(raw), "--no-ema"], root, env)
    call([sys.executable, "-m", "sdtrain.export", str(ckpt), str(ema)], root, env)
    say(f"sdtrain seed {seed}: trained in {secs:.0f} s (subprocess, start-up included)")
    return raw, ema, secs


def call(cmd: list[str], cwd: Path, env: dict, log: Path | None = None) -> None:
    """Run `cmd`; on failure show the end of its output and stop the harness."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"parity: {' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


# ---- the whole measurement -------------------------------------------------------------------


def run_seed(a, model: Path, data, shards: str, judge: Judge, seed: int) -> dict:
    out = a.out / f"seed{seed}"
    ref, ref_s = run_reference(a, model, *data, seed, out)
    raw, ema, sd_s = run_sdtrain(a, model, shards, seed, out)
    return {
        "seed": seed,
        "reference": judge_folder(ref, judge, a.per_class, a.device) | {"train_s": ref_s},
        "sdtrain_raw": judge_folder(raw, judge, a.per_class, a.device) | {"train_s": sd_s},
        "sdtrain_ema": judge_folder(ema, judge, a.per_class, a.device) | {"train_s": sd_s},
    }


RUNS = ("reference", "sdtrain_raw", "sdtrain_ema")


def mean_row(rows: list[dict]) -> dict:
    return {r: {k: float(np.mean([x[r][k] for x in rows])) for k in rows[0][r]} for r in RUNS}


def fmt(s: dict) -> str:
    return f"{s['accuracy']:.3f} (colour {s['colour']:.2f}, shape {s['shape']:.2f})"


def table(rows: list[dict]) -> str:
    head = "| seed | reference | sdtrain raw | sdtrain EMA | reference train s | sdtrain train s |"
    lines = [head, "|" + " --- |" * 6]
    for name, r in [*((str(x["seed"]), x) for x in rows), ("mean", mean_row(rows))]:
        cells = [fmt(r[k]) for k in RUNS]
        times = [f"{r['reference']['train_s']:.0f}", f"{r['sdtrain_raw']['train_s']:.0f}"]
        lines.append(f"| {name} | {' | '.join(cells + times)} |")
    return "\n".join(lines)


def environment(a: argparse.Namespace) -> dict[str, str | None]:
    """What the numbers were measured on: the device and the sdtrain commit."""
    git = ["git", "-C", str(sdtrain_root(a)), "rev-parse", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip() or None
    cuda = a.device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name(a.device) if cuda else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "sdtrain_commit": commit,  # uncommitted edits in that checkout are not recorded
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for everything (created)")
    p.add_argument("--model", type=Path, help="a tiny SD folder to reuse (default: make one)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps, both trainers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="constant, no warm-up")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--n-train", type=int, default=4800, help="training images (one data set)")
    p.add_argument("--shards", type=int, default=16, help="shards they are written as")
    p.add_argument("--per-class", type=int, default=16, help="generated images per prompt")
    p.add_argument("--judge-n", type=int, default=3000, help="real renders the judge fits on")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sdtrain-root", type=Path, help="sdtrain checkout to measure (default: this)")
    p.add_argument(
        "--sdtrain-override", action="append", default=[], help="extra Hydra override, KEY=VAL"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    say(f"device {a.device}; {a.steps} steps x batch {a.batch_size}, lr {a.lr}, seeds {a.seeds}")
    if a.model is None:
        from sdtrain.tiny import make_tiny_model

        a.model = make_tiny_model(a.out / "model", resolution=RESOLUTION)
        say(f"made the tiny model {a.model}")
    images, labels = render_set(a.n_train, seed=0)
    shards = write_shards(images, labels, a.out / "data", a.shards)
    say(f"{a.n_train} training images -> {shards}")
    judge, judge_real = train_judge(a.judge_n, 1200, a.device)
    judge_vae = vae_roundtrip_score(judge, a.model, 1200, a.device)
    say(f"judge on held-out real renders: {fmt(judge_real)}; through the VAE: {fmt(judge_vae)}")
    if judge_real["accuracy"] < 0.95:
        sys.exit(
            f"parity: the judge reads only {judge_real['accuracy']:.3f} of real images (< 0.95)"
        )
    rows = [run_seed(a, a.model, (images, labels), shards, judge, s) for s in a.seeds]
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "environment": environment(a),
        "judge": {"real": judge_real, "vae_roundtrip": judge_vae},
        "seeds": rows,
        "mean": mean_row(rows),
    }
    (a.out / "parity.json").write_text(json.dumps(result, indent=2))
    print(f"\nprompt accuracy (chance {1 / len(CLASSES):.3f}); train s = wall time\n", flush=True)
    print(table(rows), flush=True)
    say(f"wrote {a.out / 'parity.json'}")
    return result


if __name__ == "__main__":
    main()
