"""`sdtrain-sample`: the command line of `sdtrain.artifacts.sample` (its docstring is the --help)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sdtrain.artifacts import sample as sample_module
from sdtrain.artifacts.sample import (
    DTYPES,
    Settings,
    check_out,
    load_pipeline,
    read_prompts,
    sample,
    write,
)
from sdtrain.runtime import quiet


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=sample_module.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
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
    p.add_argument("--overwrite", action="store_true", help="replace earlier images in --out")
    p.add_argument("--verbose", action="store_true", help="show other libraries' loading bars")
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quiet.apply(verbose=a.verbose)  # no loading bars, no torchvision notice
    try:
        check_out(a.out, a.overwrite)  # before minutes of sampling: a refusal costs nothing
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
        paths = write(images, s, Path(a.out), label(a), a.overwrite)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise SystemExit(f"sdtrain-sample: {e}") from e
    finally:
        quiet.restore()
    print(f"wrote {len(paths)} images and {Path(a.out) / 'grid.png'}")


def label(a: argparse.Namespace) -> str:
    """The grid's title: the model, its weights, the sampler and its settings."""
    weights = "" if Path(a.model).is_dir() else (", EMA" if a.ema else ", raw")
    return f"{Path(a.model).name}{weights} · {a.sampler} {a.steps} steps · cfg {a.guidance_scale}"


if __name__ == "__main__":
    main()
