"""Learning parity, measured: sdtrain against a minimal reference loop, judged by prompt accuracy.

One tiny Stable Diffusion learns a captioned task twice at the same budget: with
`scripts/reference_loop.py` (plain diffusers + torch, fp32) and with `python -m sdtrain.train` (a
subprocess, as users train their own shards: data=webdataset, bf16-mixed on a GPU). Tasks
(`scripts/parity_tasks.py`): `shapes`, the demo's 12 classes ("a red circle", 4 colours x 3
shapes; saturates at 2000 x 128), and `glyphs`, 10 letters in near pairs written class by class
into shards (`scripts/glyphs.py`; `--classes N` keeps the first N). Each trained model generates K
images per prompt (DDIM, 25 steps, guidance 8, fixed seeds) and two small CNNs fitted on real
renders, one on pixels and one on VAE latents, name each image's class: prompt accuracy is the
fraction named as the prompt's class (chance: 1 / classes); for shapes, colour and shape
accuracy are reported apart.

From the repo root, in the project's environment (`pip install -e .`).

CPU smoke runs (the slow tests run these sizes; ~6 and ~13 min on an idle 2-core CPU):
    python scripts/parity.py --out /tmp/parity-cpu --steps 300 --batch-size 32 --n-train 1200 --per-class 4
    python scripts/parity.py --out /tmp/glyphs-cpu --task glyphs --classes 4 --steps 1000 \
        --batch-size 32 --per-class 16 --judge-n 2000

GPU (H100/H200; sdtrain in bf16-mixed with 8 loader workers, the reference in strict fp32), one
process per seed side by side (scripts/parity_parallel.sh):
    python scripts/parity.py --out parity-gpu --steps 2000 --batch-size 128 --seeds 0 1 2
    scripts/parity_parallel.sh glyphs-gpu "0 1 2" --task glyphs --steps 2000 --batch-size 128 --per-class 20

Another checkout of sdtrain (an older commit, in a git worktree whose sdtrain/ holds links to its
datamodules/, callbacks/ and conf/, so that PYTHONPATH finds them there), with the same harness:
    git worktree add /tmp/sdtrain-old <commit>
    for d in datamodules callbacks conf; do ln -s ../$d /tmp/sdtrain-old/sdtrain/$d; done
    python scripts/parity.py --out parity-old --sdtrain-root /tmp/sdtrain-old --steps 2000 --batch-size 128

An experiment on sdtrain's side only (repeatable, any Hydra override), or an ablation: one more
sdtrain run per seed with its own overrides (@mixed: the same samples written in a random order;
root=DIR: another checkout):
    python scripts/parity.py --out parity-noclip --sdtrain-override trainer.gradient_clip_val=null
    python scripts/parity.py --out ablate --task glyphs --variant mixed data.train_shards=@mixed

Writes OUT/parity.json (and OUT/rows.jsonl, a line per seed as it ends) and prints a markdown
table (per seed and mean). The data set, the model and the judges are shared across seeds; only
the training seed differs.
"""

from __future__ import annotations

import argparse
import io
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

if __package__:  # imported as scripts.parity (tests)
    from scripts.parity_tasks import TASKS, Task
    from scripts.parity_trainers import RESOLUTION, run_reference, run_sdtrain, say, sdtrain_root
    from scripts.parity_trainers import sdtrain_overrides as sdtrain_overrides  # for the tests
    from scripts.reference_loop import to_pixels
else:  # run as python scripts/parity.py
    from parity_tasks import TASKS, Task
    from parity_trainers import RESOLUTION, run_reference, run_sdtrain, say, sdtrain_root
    from parity_trainers import sdtrain_overrides as sdtrain_overrides  # for the tests
    from reference_loop import to_pixels

TASK: Task = TASKS["shapes"]()  # main() sets the one asked for


def caption(label: int) -> str:
    return TASK.caption(label)


def render_set(n: int, seed: int) -> tuple[list, torch.Tensor]:
    """`n` renders of the task (PIL) and their labels (n,), in the task's order."""
    return TASK.render_set(n, seed)


# ---- data ------------------------------------------------------------------------------------


def write_shards(
    images: list, labels: torch.Tensor, out: Path, n_shards: int, name: str = "shards"
) -> str:
    """Write the samples as `n_shards` shards in `out/name`, in the order given (as a tool that
    does not shuffle, or a folder sorted by class, leaves them); return the brace pattern."""
    import webdataset as wds

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = math.ceil(len(images) / n_shards)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            png = io.BytesIO()
            img.save(png, format="PNG")  # lossless: the shards hold exactly the in-memory pixels
            sink.write({"__key__": f"{i:06d}", "png": png.getvalue(), "txt": caption(label)})
    n = len(list(folder.glob("*.tar")))
    return f"{folder}/{{00000..{n - 1:05d}}}.tar"


# ---- judges ----------------------------------------------------------------------------------


class Judge(nn.Module):
    """A small CNN: (B, C, S, S) -> (B, classes) logits. Pixels: C=3 in [0, 1], S=32; latents:
    C=4 (scaled as the U-Net sees them), S=16."""

    def __init__(self, num_classes: int = 12, channels: int = 3, size: int = RESOLUTION) -> None:
        super().__init__()
        self.pixels = channels == 3

        def block(cin: int, cout: int) -> nn.Sequential:  # halves H and W
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())

        self.features = nn.Sequential(block(channels, 32), block(32, 64), block(64, 64))
        self.head = nn.Linear(64 * (size // 8) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1 if self.pixels else x).flatten(1))


def to_unit(images: list) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float in [0, 1] (the pixel judge's input)."""
    return (to_pixels(images) + 1) / 2


def fit_judge(x: torch.Tensor, y: torch.Tensor, device: str, epochs: int = 12) -> Judge:
    """Fit a judge on (x, y); inputs get noise of random strength (samples are never as clean)."""
    torch.manual_seed(0)
    x, y, n = x.to(device), y.to(device), len(x)
    judge = Judge(len(TASK.classes), x.shape[1], x.shape[-1]).to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * (n // 64))
    noise = 0.08 if judge.pixels else 0.3
    for _ in range(epochs):
        perm = torch.randperm(n, device=device)
        for i in range(0, n - 63, 64):
            xb, yb = x[perm[i : i + 64]], y[perm[i : i + 64]]
            xb = xb + torch.randn_like(xb) * noise * torch.rand(len(xb), 1, 1, 1, device=device)
            loss = nn.functional.cross_entropy(judge(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return judge.eval()


def train_judge(
    n_train: int, n_test: int, device: str, epochs: int = 12
) -> tuple[Judge, dict[str, float]]:
    """Fit the pixel judge on real renders (seed 1), score it on held-out renders (seed 2)."""
    images, labels = render_set(n_train, seed=1)
    judge = fit_judge(to_unit(images), labels, device, epochs)
    test_images, test_labels = render_set(n_test, seed=2)
    return judge, score(judge, to_unit(test_images), test_labels)


@torch.no_grad()
def encode(model_dir: Path, images: list, device: str) -> torch.Tensor:
    """Scaled VAE latents (posterior means) of `images`, (N, 4, 16, 16) on the CPU."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device).eval()
    x = to_pixels(images)
    z = [vae.encode(b.to(device)).latent_dist.mode().cpu() for b in x.split(256)]
    return torch.cat(z) * vae.config.scaling_factor


def train_latent_judge(model_dir: Path, n_train: int, n_test: int, device: str):
    """Fit the latent judge on the real renders' latents; score it on held-out renders'."""
    images, labels = render_set(n_train, seed=1)
    judge = fit_judge(encode(model_dir, images, device), labels, device)
    test_images, test_labels = render_set(n_test, seed=2)
    return judge, score(judge, encode(model_dir, test_images, device), test_labels)


@torch.no_grad()
def score(judge: Judge, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy of the judge's class against `labels`, and the task's breakdown (colour, shape)."""
    dev = next(judge.parameters()).device
    pred = torch.cat([judge(xb.to(dev)).argmax(1).cpu() for xb in x.split(256)])
    return {"accuracy": (pred == labels).float().mean().item(), **TASK.breakdown(pred, labels)}


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
def generate(folder: Path, per_class: int, device: str):
    """`per_class` samples per prompt from the diffusers folder: scaled latents (N, 4, 16, 16),
    images (N, 3, 32, 32) in [0, 1] and labels (N,)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(len(TASK.classes)).repeat_interleave(per_class)  # class by class
    latents = pipe(
        [caption(label) for label in labels.tolist()],
        num_inference_steps=25,
        guidance_scale=8.0,
        height=RESOLUTION,
        width=RESOLUTION,
        # CPU generators: image i starts from the same noise for every model, on every device.
        generator=[torch.Generator().manual_seed(i) for i in range(len(labels))],
        output_type="latent",
    ).images  # (N, 4, 16, 16), scaled
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return latents.float().cpu(), ((images.float() + 1) / 2).clamp(0, 1).cpu(), labels


def judge_folder(folder: Path, judges: dict, per_class: int, device: str) -> dict[str, float]:
    """The pixel judge's scores, plus the latent judge's accuracy as `latent_accuracy`."""
    t0 = time.perf_counter()
    latents, x, labels = generate(folder, per_class, device)
    result = score(judges["pixel"], x, labels)
    result["latent_accuracy"] = score(judges["latent"], latents, labels)["accuracy"]
    save_grid(x, per_class, folder / "samples.png")
    say(f"judged {folder.name}: {fmt(result)} ({time.perf_counter() - t0:.0f} s)")
    return result


def save_grid(x: torch.Tensor, per_class: int, path: Path) -> None:
    """One row per class, `per_class` images across: to look at what the numbers mean."""
    from PIL import Image

    rows = x.view(len(TASK.classes), per_class, 3, RESOLUTION, RESOLUTION)
    grid = rows.permute(0, 3, 1, 4, 2).reshape(len(TASK.classes) * RESOLUTION, -1, 3)
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save(path)


# ---- the whole measurement -------------------------------------------------------------------


def variants(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, extra overrides) of each sdtrain run per seed: "sdtrain" as configured, then each
    --variant NAME KEY=VAL ..."""
    return [("sdtrain", []), *((v[0], v[1:]) for v in a.variant)]


def run_seed(a, model: Path, data, shards: str, judges: dict, seed: int) -> dict:
    out = a.out / f"seed{seed}"
    row: dict = {"seed": seed}
    if not a.no_reference:
        images, labels = data
        captions = [caption(label) for label in labels.tolist()]
        ref, ref_s = run_reference(a, model, images, captions, seed, out)
        row["reference"] = judge_folder(ref, judges, a.per_class, a.device) | {"train_s": ref_s}
    for name, extra in [] if a.no_sdtrain else variants(a):
        raw, ema, secs = run_sdtrain(a, model, shards, seed, out, name, extra)
        for kind, folder in (("raw", raw), ("ema", ema)):
            scores = judge_folder(folder, judges, a.per_class, a.device)
            row[f"{name}_{kind}"] = scores | {"train_s": secs}
    with open(a.out / "rows.jsonl", "a") as f:  # each seed as it finishes: a cut-off run keeps it
        f.write(json.dumps(row) + "\n")
    return row


def runs(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k != "seed"]


def mean_row(rows: list[dict]) -> dict:
    return {r: {k: float(np.mean([x[r][k] for x in rows])) for k in rows[0][r]} for r in runs(rows)}


def fmt(s: dict) -> str:
    extra = "".join(f", {k} {s[k]:.2f}" for k in ("colour", "shape") if k in s)
    latent = f", latent {s['latent_accuracy']:.3f}" if "latent_accuracy" in s else ""
    return (
        f"{s['accuracy']:.3f} ({latent.lstrip(', ')}{extra})"
        if latent or extra
        else (f"{s['accuracy']:.3f}")
    )


def table(rows: list[dict]) -> str:
    names = runs(rows)
    lines = [f"| seed | {' | '.join(names)} |", "|" + " --- |" * (len(names) + 1)]
    for name, r in [*((str(x["seed"]), x) for x in rows), ("mean", mean_row(rows))]:
        lines.append(f"| {name} | {' | '.join(fmt(r[k]) for k in names)} |")
    secs = ", ".join(f"{k} {mean_row(rows)[k]['train_s']:.0f} s" for k in names)
    return "\n".join(lines) + f"\n\nmean train wall time: {secs}"


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
    p.add_argument(
        "--task", choices=sorted(TASKS), default="shapes", help="scripts/parity_tasks.py"
    )
    p.add_argument("--model", type=Path, help="a tiny SD folder to reuse (default: make one)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps, both trainers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="constant, no warm-up")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--n-train", type=int, help="training images (default: the task's)")
    p.add_argument("--shards", type=int, help="shards they are written as (default: the task's)")
    p.add_argument("--per-class", type=int, default=16, help="generated images per prompt")
    p.add_argument("--judge-n", type=int, default=3000, help="real renders the judges fit on")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sdtrain-root", type=Path, help="sdtrain checkout to measure (default: this)")
    p.add_argument(
        "--sdtrain-override", action="append", default=[], help="extra Hydra override, KEY=VAL"
    )
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME [KEY=VAL ...]",
        help="one more sdtrain run per seed, with these overrides (an ablation); @mixed in a "
        "value stands for the same samples written in a random order; root=DIR measures the sdtrain "
        "checkout DIR",
    )
    p.add_argument("--no-reference", action="store_true", help="sdtrain runs only")
    p.add_argument(
        "--keep-callbacks", action="store_true", help="keep sample_images and throughput on"
    )
    p.add_argument("--classes", type=int, help="glyphs: the first N classes only (default all)")
    p.add_argument("--jitter", type=float, default=1.0, help="glyphs: x the default jitter")
    p.add_argument("--no-sdtrain", action="store_true", help="the reference loop only")
    a = p.parse_args(argv)
    task = TASKS[a.task](a.classes, a.jitter)
    a.n_train = a.n_train or task.n_train
    a.shards = a.shards or task.shards
    return a


def main(argv: list[str] | None = None) -> dict:
    global TASK
    a = parse_args(argv)
    TASK = TASKS[a.task](a.classes, a.jitter)
    a.out.mkdir(parents=True, exist_ok=True)
    say(f"task {a.task} on {a.device}; {a.steps} steps x batch {a.batch_size}, lr {a.lr}, "
        f"seeds {a.seeds}")  # fmt: skip
    if a.model is None:
        a.model = TASK.make_model(a.out / "model")
        say(f"made the tiny model {a.model}")
    images, labels = render_set(a.n_train, seed=0)
    shards = write_shards(images, labels, a.out / "data", a.shards)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist()
    mixed = write_shards([images[i] for i in perm], labels[perm], a.out / "data", a.shards, "mixed")
    a.variant = [[v.replace("@mixed", f"'{mixed}'") for v in var] for var in a.variant]
    say(f"{a.n_train} training images -> {shards}; in a random order -> {mixed}")
    pixel, judge_real = train_judge(a.judge_n, 1200, a.device)
    latent, latent_real = train_latent_judge(a.model, a.judge_n, 1200, a.device)
    judge_vae = vae_roundtrip_score(pixel, a.model, 1200, a.device)
    say(f"judges on held-out real renders: pixel {fmt(judge_real)}, latent {fmt(latent_real)}; "
        f"pixel through the VAE: {fmt(judge_vae)}")  # fmt: skip
    if judge_real["accuracy"] < 0.95:
        sys.exit(
            f"parity: the judge reads only {judge_real['accuracy']:.3f} of real images (< 0.95)"
        )
    judges = {"pixel": pixel, "latent": latent}
    rows = [run_seed(a, a.model, (images, labels), shards, judges, s) for s in a.seeds]
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "environment": environment(a),
        "judge": {"real": judge_real, "latent_real": latent_real, "vae_roundtrip": judge_vae},
        "seeds": rows,
        "mean": mean_row(rows),
    }
    (a.out / "parity.json").write_text(json.dumps(result, indent=2))
    print(f"\nprompt accuracy (chance {1 / len(TASK.classes):.3f}); pixel judge (latent judge)\n")
    print(table(rows), flush=True)
    say(f"wrote {a.out / 'parity.json'}")
    return result


if __name__ == "__main__":
    main()
