"""Make images from an sdtrain checkpoint or an exported diffusers folder.

    sdtrain-sample MODEL --prompt "a red circle" [--prompt ...] [--prompts-file FILE] --out DIR
                   [--seed 0 [--seed 1 ...]] [--steps 25] [--guidance-scale 5] [--sampler ddim]
                   [--height H] [--width W] [--device cuda] [--no-ema] [--pretrained FOLDER]
                   [--overwrite] [--verbose]

MODEL is a .ckpt written by sdtrain-train (EMA weights by default, --no-ema for the raw ones; the
VAE and text encoder come from the model folder the run recorded, --pretrained if it moved) or a
folder written by sdtrain-export. Each prompt is drawn once per seed: image (prompt, seed) starts
from the noise of that seed alone, so the same seed gives the same image. OUT gets one PNG per
image (`000_a-red-circle_seed0.png`), `grid.png` (captioned) and `samples.json` (what made them).
OUT must be new or empty: --overwrite replaces a folder of earlier sdtrain-sample images whole (no
image of the earlier set stays beside the new ones); a folder of other files is refused even then.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sdtrain.artifacts.checkpoint import is_sharded
from sdtrain.artifacts.outputs import check_folder, new_folder
from sdtrain.artifacts.sampling import build_pipeline, generate, grid

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RECORD = "samples.json"  # what a folder of earlier sdtrain-sample images holds
IMAGES = "sdtrain-sample images"


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """`out` if images may be written there: new, empty, or earlier images and `overwrite`."""
    return check_folder(out, overwrite, (RECORD,), IMAGES)


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
    """A pipeline over a checkpoint's U-Net or an exported folder, with the given sampler: the
    model family's (`StableDiffusionXLPipeline` for SDXL, `StableDiffusionPipeline` for SD)."""
    path = Path(model).expanduser()
    if path.is_file() or is_sharded(path):  # a checkpoint: one file, or trainer=fsdp's folder
        from sdtrain.artifacts.export import checkpoint_parts

        p = checkpoint_parts(path, ema, pretrained)
        modules = (p.vae, p.text_encoder, p.tokenizer, p.unet, p.noise_scheduler)
        return build_pipeline(*modules, sampler, family=p.family)
    if path.is_dir() and (path / "model_index.json").is_file():
        from sdtrain.models.loader import load_parts
        from sdtrain.models.parts import load_scheduler

        if not ema or pretrained:
            raise ValueError(
                f"{path} is an exported folder: --no-ema and --pretrained need a .ckpt"
            )
        p = load_parts(path)  # the family's parts (SDXL: both text encoders and tokenizers)
        modules = (p.vae, p.text_encoder, p.tokenizer, p.unet, load_scheduler(path))
        return build_pipeline(*modules, sampler, family=p.family)  # the folder's own schedule
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


def write(
    images: list[Image.Image], s: Settings, out: Path, label: str, overwrite: bool = False
) -> list[Path]:
    """One PNG per image, the captioned grid and samples.json in the folder `out` (see
    `check_out`), which they replace whole once written; returns the PNG paths."""
    out = check_out(out, overwrite)
    jobs, names, files = s.jobs(), [], []
    with new_folder(out) as tmp:
        for i, (img, (prompt, seed)) in enumerate(zip(images, jobs, strict=True)):
            names.append(f"{i:03d}_{slug(prompt)}_seed{seed}.png")
            img.save(tmp / names[-1])
            files.append({"file": names[-1], "prompt": prompt, "seed": seed})
        several = len(s.seeds) > 1
        captions = [f"{p} (seed {seed})" if several else p for p, seed in jobs]
        grid(images, captions, label=label).save(tmp / "grid.png")
        record = {"label": label, "settings": asdict(s), "images": files}
        (tmp / RECORD).write_text(json.dumps(record, indent=2))
    return [out / name for name in names]


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
