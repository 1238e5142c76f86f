"""DreamBooth on the demo model, with and without prior preservation: how far the instance token
moves the samples, and how far the class prompt's samples drift from the base model's.

    python scripts/dreambooth_demo.py OUT [--steps 300] [--lr 1e-4] [--base RUN_OR_FOLDER]

1. The base: the demo (`sdtrain-train`, 1200 steps) exported to OUT/base_model (or --base: a run
   folder of the demo, or an exported folder).
2. The subject: 5 green squares captioned "a sks square" (sdtrain-shards).
3. Two DreamBooth runs of --steps on the base (experiment=dreambooth, 32 px): with prior
   preservation (1 instance + 1 class image a batch, class prompt "a square", 100 class images
   drawn by the base, prior_loss_weight 1) and without (1 instance image a batch).
4. Each model draws "a sks square", "a square" (SEEDS seeds each) and the demo's 12 captions; the
   demo's judge (`sdtrain.demo.judge`) names colour and shape. Printed as a table, written to
   OUT/dreambooth_demo.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

INSTANCE, CLASS = "a sks square", "a square"
SUBJECT = ("green", "square")  # the base draws "a sks square" yellow, "a square" red
SEEDS = 48
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SAMPLING = dict(steps=20, guidance_scale=6.0)  # the demo's sampling settings


PROGRAMS = {"sdtrain-train": "sdtrain.cli.train", "sdtrain-export": "sdtrain.cli.export",
            "sdtrain-shards": "sdtrain.cli.shards"}  # fmt: skip


def sh(program: str, *args: str) -> None:
    """Run an sdtrain command (as `python -m`: works without the console scripts installed)."""
    print("+", program, " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", PROGRAMS[program], *args], check=True)


def base_model(out: Path, base: str | None) -> Path:
    """An exported folder of the demo model: --base as it is, else trained and exported here."""
    if base and (Path(base) / "model_index.json").is_file():
        return Path(base)
    run = Path(base) if base else out / "base_run"
    if not (run / "checkpoints" / "last.ckpt").is_file():
        sh("sdtrain-train", f"hydra.run.dir={run}", "logger=csv")
    folder = out / "base_model"
    if not (folder / "model_index.json").is_file():
        sh("sdtrain-export", str(run / "checkpoints" / "last.ckpt"), str(folder))
    return folder


def subject_shards(out: Path) -> Path:
    from sdtrain.demo import shapes

    folder, shards = out / "subject", out / "subject_shards"
    if not shards.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        for i in range(5):
            shapes.render(*SUBJECT, 32, rng).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(INSTANCE)
        sh("sdtrain-shards", str(folder), str(shards))
    return shards


def dreambooth(out: Path, name: str, model: Path, shards: Path, prior: bool, a) -> Path:
    run = out / name
    if not (run / "checkpoints" / "last.ckpt").is_file():
        per_batch = ["data.batch_size=2", "data.dreambooth.class_per_batch=1"] if prior else [
            "data.batch_size=1", "data.dreambooth.class_per_batch=0"]  # fmt: skip
        sh(
            "sdtrain-train", "experiment=dreambooth", f"hydra.run.dir={run}",
            f"model.pretrained={model}", f"data.dreambooth.instance_shards={shards}",
            f"data.dreambooth.class_images.prompt='{CLASS}'",
            f"data.dreambooth.class_images.num_images={a.class_images}",
            f"data.dreambooth.class_images.steps={SAMPLING['steps']}",
            f"data.dreambooth.class_images.guidance_scale={SAMPLING['guidance_scale']}",
            f"data.dreambooth.cache_dir={out / 'class_images'}", *per_batch,
            "data.resolution=32", "data.num_workers=1", f"trainer={a.trainer}", f"trainer.max_steps={a.steps}",
            f"model.optimizer.lr={a.lr}", "logger=csv", "callbacks.sample_images.every_n_steps=100",
            f"callbacks.sample_images.prompts=['{INSTANCE}','{CLASS}']",
            f"callbacks.model_checkpoint.every_n_train_steps={a.steps}",
        )  # fmt: skip
    return run / "checkpoints" / "last.ckpt"


def draw(model: Path, seeds: int = SEEDS) -> dict[str, list]:
    """{prompt: images} for the instance and class prompts and the demo's captions."""
    from sdtrain.artifacts.sample import Settings, load_pipeline, sample
    from sdtrain.demo import shapes

    pipe = load_pipeline(model, "ddim", ema=not model.is_file()).to(DEVICE)  # runs keep no EMA
    demo = [f"a {c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]
    prompts = {INSTANCE: list(range(seeds)), CLASS: list(range(seeds))}
    prompts |= {p: list(range(4)) for p in demo}
    return {
        p: sample(pipe, Settings([p], seeds, SAMPLING["steps"], SAMPLING["guidance_scale"],
                                 batch_size=48))
        for p, seeds in prompts.items()
    }  # fmt: skip


def measure(images: dict[str, list], base: dict[str, list]) -> dict[str, float]:
    from sdtrain.demo.judge import judge, score

    def share(imgs, colour=None, shape=None):
        verdicts = [judge(i) for i in imgs]
        return float(np.mean([(colour in (None, v.colour)) and (shape in (None, v.shape))
                              for v in verdicts]))  # fmt: skip

    def pixels(a, b):  # mean |difference| per pixel and channel, 0..255, same seeds
        return float(np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean()
                              for x, y in zip(a, b, strict=True)]))  # fmt: skip

    demo = [p for p in images if p not in (INSTANCE, CLASS)]
    flat = [i for p in demo for i in images[p]]
    return {
        "instance_subject": share(images[INSTANCE], *SUBJECT),
        "class_subject_colour": share(images[CLASS], colour=SUBJECT[0]),
        "class_square": share(images[CLASS], shape=SUBJECT[1]),
        "class_pixel_diff": pixels(images[CLASS], base[CLASS]),
        "instance_pixel_diff": pixels(images[INSTANCE], base[INSTANCE]),
        "demo_both": score(flat, [p for p in demo for _ in images[p]])["both"],
        "demo_pixel_diff": pixels(flat, [i for p in demo for i in base[p]]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--base", help="a demo run folder or an exported demo model")
    p.add_argument("--class-images", type=int, default=100, help="class images drawn")
    p.add_argument("--seeds", type=int, default=SEEDS, help="images per prompt")
    p.add_argument("--trainer", default="gpu" if DEVICE == "cuda" else "cpu")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model, shards = base_model(out, a.base), subject_shards(out)
    runs = {"prior": dreambooth(out, "prior", model, shards, True, a),
            "no_prior": dreambooth(out, "no_prior", model, shards, False, a)}  # fmt: skip
    base = draw(model, a.seeds)
    rows = {"base": measure(base, base)}
    rows |= {name: measure(draw(ckpt, a.seeds), base) for name, ckpt in runs.items()}
    keys = list(rows["base"])
    print(f"{'model':10s}" + "".join(f"{k:>20s}" for k in keys))
    for name, row in rows.items():
        print(f"{name:10s}" + "".join(f"{row[k]:20.3f}" for k in keys))
    record = {
        "steps": a.steps,
        "lr": a.lr,
        "class_images": a.class_images,
        "seeds": a.seeds,
        "rows": rows,
    }
    (out / "dreambooth_demo.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
