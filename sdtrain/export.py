"""Export a training checkpoint as a diffusers Stable Diffusion folder.

    sdtrain-export CKPT OUT [--no-ema] [--pretrained FOLDER]

OUT loads with diffusers alone: StableDiffusionPipeline.from_pretrained(OUT). The U-Net gets the
EMA weights by default (--no-ema for the raw ones); VAE, text encoder, tokenizer and scheduler come
from the model folder the run trained with (recorded in the checkpoint; --pretrained if it moved).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from sdtrain.callbacks.ema import EMA


def unet_weights(ckpt: dict, ema: bool, ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """The U-Net state dict from a checkpoint: the EMA shadow, or the trained weights."""
    if ema:
        state = ckpt.get("callbacks", {}).get(EMA.__qualname__)
        if not state or state.get("shadow") is None:
            raise KeyError(
                f"{ckpt_path} holds no EMA weights (trained without the EMA "
                "callback?); pass --no-ema to export the raw U-Net"
            )
        return dict(state["shadow"])
    return {k[len("unet.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}


def export(
    ckpt_path: str | Path, out: str | Path, ema: bool = True, pretrained: str | Path | None = None
) -> Path:
    """Write the diffusers folder `out` from the checkpoint at `ckpt_path`; return `out`."""
    from diffusers import UNet2DConditionModel

    from sdtrain.models import assemble_pipeline, load_frozen, load_scheduler

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"CKPT {ckpt_path} is not a file")
    # weights_only: a checkpoint is data; unpickling arbitrary objects could run code.
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{ckpt_path} does not load as a checkpoint with weights_only=True ({first})"
        ) from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{ckpt_path} is not an sdtrain checkpoint (holds {type(ckpt).__name__})")
    meta = ckpt.get("sdtrain")
    if meta is None:
        raise KeyError(f"{ckpt_path} is not an sdtrain checkpoint (no 'sdtrain' entry)")
    folder = Path(pretrained or meta["pretrained"])
    if not folder.is_dir():
        raise FileNotFoundError(f"the run's model folder {folder} is gone; pass --pretrained")
    vae, text_encoder, tokenizer, _ = load_frozen(folder)
    scheduler = load_scheduler(folder)  # the folder's own sampler (SD-1.5's PNDM stays PNDM)
    scheduler.register_to_config(prediction_type=meta["prediction_type"])
    unet = UNet2DConditionModel.from_config(meta["unet_config"])
    missing, unexpected = unet.load_state_dict(unet_weights(ckpt, ema, ckpt_path), strict=False)
    params = {k for k, _ in unet.named_parameters()}
    if unexpected or params & set(missing):
        raise KeyError(
            f"{ckpt_path}: U-Net weights do not match its config "
            f"(missing {sorted(params & set(missing))[:3]}, unexpected {unexpected[:3]})"
        )
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
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
