"""Make images from an sdtrain checkpoint or an exported diffusers folder.

    sdtrain-sample MODEL --prompt "a red circle" [--prompt ...] [--prompts-file FILE] --out DIR
                   [--seed 0 [--seed 1 ...]] [--steps 25] [--guidance-scale 5] [--sampler ddim]
                   [--height H] [--width W] [--device cuda] [--no-ema] [--pretrained FOLDER]

MODEL is a .ckpt written by sdtrain-train (EMA weights by default, --no-ema for the raw ones; the
VAE and text encoder come from the model folder the run recorded, --pretrained if it moved) or a
folder written by sdtrain-export. Each prompt is drawn once per seed: image (prompt, seed) starts
from the noise of that seed alone, so the same seed gives the same image. OUT gets one PNG per
image (`000_a-red-circle_seed0.png`), `grid.png` (captioned) and `samples.json` (what made them).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sdtrain.checkpoint import is_sharded
from sdtrain.sampling import build_pipeline, generate, grid

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Settings:
    """What to draw and how; one image per (prompt, seed)."""

    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 25
    guidance_scale: float = 5.0
    sampler: str = "ddim"
    height: int | None = None
    width: int | None = None
    batch_size: int = 8  # images per pipeline call

    def jobs(self) -> list[tuple[str, int]]:
        """(prompt, seed) for every image, prompt-major."""
        return [(p, s) for p in self.prompts for s in self.seeds]


def load_pipeline(
    model: str | Path, sampler: str = "ddim", ema: bool = True, pretrained: str | None = None
):
    """A pipeline over a checkpoint's U-Net or an exported folder, with the given sampler."""
    path = Path(model).expanduser()
    if path.is_file() or is_sharded(path):  # a checkpoint: one file, or trainer=fsdp's folder
        from sdtrain.export import checkpoint_parts

        p = checkpoint_parts(path, ema, pretrained)
        return build_pipeline(
            p.vae, p.text_encoder, p.tokenizer, p.unet, p.noise_scheduler, sampler
        )
    if path.is_dir() and (path / "model_index.json").is_file():
        from diffusers import StableDiffusionPipeline

        if not ema or pretrained:
            raise ValueError(
                f"{path} is an exported folder: --no-ema and --pretrained need a .ckpt"
            )
        p = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        return build_pipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, p.scheduler, sampler)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder without model_index.json (not an export)")
    raise FileNotFoundError(f"{path} does not exist (expected a .ckpt or an exported folder)")


def sample(pipe, s: Settings) -> list[Image.Image]:
    """Every (prompt, seed) image, in `s.jobs()` order, `s.batch_size` per pipeline call."""
    jobs, images = s.jobs(), []
    for i in range(0, len(jobs), s.batch_size):
        chunk = jobs[i : i + s.batch_size]
        images += generate(
            pipe,
            [p for p, _ in chunk],
            steps=s.steps,
            guidance_scale=s.guidance_scale,
            height=s.height,
            width=s.width,
            seeds=[seed for _, seed in chunk],
        )
    return images


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def write(images: list[Image.Image], s: Settings, out: Path, label: str) -> list[Path]:
    """One PNG per image, the captioned grid and samples.json in `out`; returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    jobs, paths, files = s.jobs(), [], []
    for i, (img, (prompt, seed)) in enumerate(zip(images, jobs, strict=True)):
        paths.append(out / f"{i:03d}_{slug(prompt)}_seed{seed}.png")
        img.save(paths[-1])
        files.append({"file": paths[-1].name, "prompt": prompt, "seed": seed})
    several = len(s.seeds) > 1
    captions = [f"{p} (seed {seed})" if several else p for p, seed in jobs]
    grid(images, captions, label=label).save(out / "grid.png")
    record = {"label": label, "settings": asdict(s), "images": files}
    (out / "samples.json").write_text(json.dumps(record, indent=2))
    return paths


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """The --prompt values, then the file's non-empty lines."""
    prompts = list(prompts)
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} is not a file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", help="a .ckpt from sdtrain-train or a folder from sdtrain-export")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--out", required=True, help="folder for the PNGs and grid.png")
    p.add_argument("--seed", type=int, action="append", help="a seed (repeatable; default 0)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale (1: off)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "euler", "dpm++"])
    p.add_argument("--height", type=int, help="pixels (default: the model's own size)")
    p.add_argument("--width", type=int, help="pixels (default: the model's own size)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if there is one)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="default fp32")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="a checkpoint's raw weights")
    p.add_argument("--pretrained", help="model folder, if the one the run used has moved")
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        s = Settings(
            read_prompts(a.prompt, a.prompts_file),
            a.seed or [0],
            a.steps,
            a.guidance_scale,
            a.sampler,
            a.height,
            a.width,
            a.batch_size,
        )
        pipe = load_pipeline(a.model, a.sampler, a.ema, a.pretrained).to(device)
        if a.dtype != "fp32":
            pipe.to(dtype=DTYPES[a.dtype])
        images = sample(pipe, s)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise SystemExit(f"sdtrain-sample: {e}") from e
    weights = "" if Path(a.model).is_dir() else (", EMA" if a.ema else ", raw")
    label = f"{Path(a.model).name}{weights} · {a.sampler} {a.steps} steps · cfg {a.guidance_scale}"
    paths = write(images, s, Path(a.out), label)
    print(f"wrote {len(paths)} images and {Path(a.out) / 'grid.png'}")


if __name__ == "__main__":
    main()
