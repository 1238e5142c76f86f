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
from sdtrain.models import Parts


def export(
    ckpt_path: str | Path, out: str | Path, ema: bool = True, pretrained: str | Path | None = None
) -> Path:
    """Write the diffusers folder `out` from the checkpoint at `ckpt_path`; return `out`."""
    from sdtrain.models import assemble_pipeline, load_scheduler

    parts = checkpoint_parts(ckpt_path, ema, pretrained)
    scheduler = load_scheduler(parts.pretrained)  # the folder's own sampler (PNDM stays PNDM)
    scheduler.register_to_config(prediction_type=parts.noise_scheduler.config.prediction_type)
    pipe = assemble_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.unet, scheduler)
    out = Path(out)
    pipe.save_pretrained(out)
    return out


def checkpoint_parts(
    ckpt_path: str | Path, ema: bool = True, pretrained: str | Path | None = None
) -> Parts:
    """The parts a checkpoint trained: its U-Net (EMA or raw weights) with the frozen parts and
    noise scheduler (with the run's prediction type) of the model folder it records."""
    from sdtrain.models import load_parts

    ckpt = checkpoint.load(ckpt_path)  # weights_only, upgraded to the current schema
    run = checkpoint.run_info(ckpt)
    folder = pretrained or run["pretrained"]
    if folder is None or not Path(folder).is_dir():
        raise FileNotFoundError(f"the run's model folder {folder} is gone; pass --pretrained")
    # a U-Net of the run's shape, the noise schedule it trained for
    parts = load_parts(folder, run["unet_config"], run["prediction_type"])
    unet = parts.unet
    weights = checkpoint.unet_weights(ckpt, ema, str(ckpt_path))
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    params = {k for k, _ in unet.named_parameters()}
    if unexpected or params & set(missing):
        raise KeyError(
            f"{ckpt_path}: U-Net weights do not match its config "
            f"(missing {sorted(params & set(missing))[:3]}, unexpected {unexpected[:3]})"
        )
    return parts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ckpt", help="a .ckpt written by sdtrain-train")
    p.add_argument("out", help="folder to write")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights")
    p.add_argument("--pretrained", help="model folder, if the one the run used has moved")
    a = p.parse_args(argv)
    try:
        out = export(a.ckpt, a.out, a.ema, a.pretrained)
    except checkpoint.CheckpointError as e:
        raise SystemExit(
            f"sdtrain-export: {e}; pass a .ckpt that sdtrain-train wrote "
            "(<run folder>/checkpoints/last.ckpt)"
        ) from e
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"sdtrain-export: {e}") from e
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
