"""Export a training checkpoint as a diffusers Stable Diffusion folder.

    sdtrain-export CKPT OUT [--no-ema] [--pretrained FOLDER]

OUT loads with diffusers alone: StableDiffusionPipeline.from_pretrained(OUT). The U-Net gets the
EMA weights by default (--no-ema for the raw ones); VAE, text encoder, tokenizer and scheduler come
from the model folder the run trained with (recorded in the checkpoint; --pretrained if it moved).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdtrain import checkpoint


def export(
    ckpt_path: str | Path, out: str | Path, ema: bool = True, pretrained: str | Path | None = None
) -> Path:
    """Write the diffusers folder `out` from the checkpoint at `ckpt_path`; return `out`."""
    from sdtrain.models import assemble_pipeline, load_parts, load_scheduler

    ckpt = checkpoint.load(ckpt_path)  # weights_only, upgraded to the current schema
    run = checkpoint.run_info(ckpt)
    folder = pretrained or run["pretrained"]
    if folder is None or not Path(folder).is_dir():
        raise FileNotFoundError(f"the run's model folder {folder} is gone; pass --pretrained")
    parts = load_parts(folder, unet_config=run["unet_config"])  # a U-Net of the run's shape
    scheduler = load_scheduler(folder)  # the folder's own sampler (SD-1.5's PNDM stays PNDM)
    scheduler.register_to_config(prediction_type=run["prediction_type"])
    unet = parts.unet
    weights = checkpoint.unet_weights(ckpt, ema, str(ckpt_path))
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    params = {k for k, _ in unet.named_parameters()}
    if unexpected or params & set(missing):
        raise KeyError(
            f"{ckpt_path}: U-Net weights do not match its config "
            f"(missing {sorted(params & set(missing))[:3]}, unexpected {unexpected[:3]})"
        )
    pipe = assemble_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, unet, scheduler)
    out = Path(out)
    pipe.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ckpt", help="a .ckpt written by sdtrain-train")
    p.add_argument("out", help="folder to write")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights")
    p.add_argument("--pretrained", help="model folder, if the one the run used has moved")
    a = p.parse_args(argv)
    try:
        out = export(a.ckpt, a.out, a.ema, a.pretrained)
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"sdtrain-export: {e}") from e
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
