"""Export a training checkpoint as a diffusers Stable Diffusion folder.

    sdtrain-export CKPT OUT [--no-ema] [--pretrained FOLDER]
    sdtrain-export CKPT [OUT] --single-file FILE.safetensors [--dtype fp16|fp32]
    sdtrain-export CKPT OUT --lora [--no-ema]

OUT loads with diffusers alone: StableDiffusionPipeline.from_pretrained(OUT). The U-Net gets the
EMA weights by default (--no-ema for the raw ones); VAE, text encoder, tokenizer and scheduler come
from the model folder the run trained with (recorded in the checkpoint; --pretrained if it moved).
--single-file writes one .safetensors in the original SD layout (AUTOMATIC1111, ComfyUI,
diffusers' from_single_file). A run that trained from a single file reloads it with the folder of
configs and tokenizer it recorded (model.single_file_config; --single-file-config if it moved).
A LoRA run (model.lora) exports with its adapters merged in; --lora writes the adapters alone
(`sdtrain.export_lora`: diffusers' and kohya's LoRA files).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdtrain import checkpoint, lora
from sdtrain.models import Parts


def export(
    ckpt_path: str | Path,
    out: str | Path,
    ema: bool = True,
    pretrained: str | Path | None = None,
    single_file_config: str | Path | None = None,
) -> Path:
    """Write the diffusers folder `out` from the checkpoint at `ckpt_path`; return `out`."""
    from sdtrain.models import assemble_pipeline, load_scheduler
    from sdtrain.single_file import is_single_file

    parts = checkpoint_parts(ckpt_path, ema, pretrained, single_file_config)
    configs = parts.single_file_config if is_single_file(parts.pretrained) else parts.pretrained
    scheduler = sampler_for(load_scheduler(configs), parts.noise_scheduler)
    pipe = assemble_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.unet, scheduler)
    out = Path(out)
    pipe.save_pretrained(out)
    return out


def sampler_for(folder_scheduler, trained):
    """The folder's own sampler (PNDM stays PNDM) with the schedule the run trained on: its
    prediction type and, for a zero-terminal-SNR run, the rescaled betas with "trailing" spacing
    (a sampler that cannot rescale, e.g. PNDM, gives way to DDIM, which can)."""
    import inspect

    from diffusers import DDIMScheduler

    scheduler = folder_scheduler
    scheduler.register_to_config(prediction_type=trained.config.prediction_type)
    if not trained.config.get("rescale_betas_zero_snr"):
        return scheduler
    cls = type(scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        print(f"{cls.__name__} cannot sample a zero-terminal-SNR schedule: exporting DDIMScheduler")
        cls = DDIMScheduler
    return cls.from_config(
        scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )


def export_single_file(
    ckpt_path: str | Path,
    out: str | Path,
    ema: bool = True,
    pretrained: str | Path | None = None,
    single_file_config: str | Path | None = None,
    dtype: str = "fp16",
) -> Path:
    """Write one original-layout .safetensors `out` (U-Net, VAE, text encoder); return `out`."""
    from sdtrain.single_file import save_single_file

    parts = checkpoint_parts(ckpt_path, ema, pretrained, single_file_config)
    return save_single_file(out, parts.unet, parts.vae, parts.text_encoder, dtype)


def checkpoint_parts(
    ckpt_path: str | Path,
    ema: bool = True,
    pretrained: str | Path | None = None,
    single_file_config: str | Path | None = None,
    fuse: bool = True,
) -> Parts:
    """The parts a checkpoint trained: its U-Net (EMA or raw weights) with the frozen parts and
    noise scheduler (with the run's prediction type) of the model folder (or single file) it
    records; a single file's configs and tokenizer come from `single_file_config`. A LoRA run's
    adapters are merged into the base weights (`fuse`), or left as adapters (`sdtrain.export_lora`);
    a trained text encoder gets its weights."""
    from sdtrain.models import load_parts
    from sdtrain.single_file import is_single_file

    ckpt = checkpoint.load(ckpt_path)  # weights_only, upgraded to the current schema
    run = checkpoint.run_info(ckpt)
    folder = pretrained or run["pretrained"]
    if folder is None or not Path(folder).exists():
        raise FileNotFoundError(f"the run's model folder {folder} is gone; pass --pretrained")
    single_file_config = single_file_config or run.get("single_file_config")  # absent: older
    if is_single_file(folder) and not (single_file_config and Path(single_file_config).is_dir()):
        raise ValueError(
            f"the run trained from the single file {folder}; its configs folder "
            f"{single_file_config} is gone: pass --single-file-config, the folder of configs and "
            "tokenizer it trained with"
        )
    # a U-Net of the run's shape, the noise schedule it trained for
    unet_config = None if run.get("lora") else run["unet_config"]  # LoRA: on the folder's U-Net
    parts = load_parts(
        folder,
        unet_config,
        run["prediction_type"],
        zero_terminal_snr=bool(run.get("zero_terminal_snr")),  # absent: older checkpoints
        single_file_config=single_file_config,
    )
    lora.add_recorded(parts, run.get("lora"))  # a LoRA run: adapters to load its weights into
    unet = parts.unet
    weights = checkpoint.unet_weights(ckpt, ema, str(ckpt_path))
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    params = {k for k, p in unet.named_parameters() if p.requires_grad}  # LoRA: the adapters
    if unexpected or params & set(missing):
        raise KeyError(
            f"{ckpt_path}: U-Net weights do not match its config "
            f"(missing {sorted(params & set(missing))[:3]}, unexpected {unexpected[:3]})"
        )
    text = checkpoint.text_encoder_weights(ckpt, ema)
    lora.load_text_encoder(parts.text_encoder, text, str(ckpt_path))
    if fuse:
        lora.fuse(parts.unet)
        lora.fuse(parts.text_encoder)
    return parts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ckpt", help="a .ckpt written by sdtrain-train")
    p.add_argument("out", nargs="?", help="diffusers folder to write (optional with --single-file)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights")
    p.add_argument("--pretrained", help="model folder, if the one the run used has moved")
    p.add_argument("--single-file", help="also (or only) write this original-layout .safetensors")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="--single-file's")
    p.add_argument("--single-file-config", help="configs folder of a run that trained from a file")
    p.add_argument("--lora", action="store_true", help="a LoRA run: OUT gets its LoRA files only")
    a = p.parse_args(argv)
    if a.out is None and a.single_file is None:
        p.error("give OUT (a diffusers folder), --single-file FILE.safetensors, or both")
    try:
        if a.single_file:
            args = (a.ema, a.pretrained, a.single_file_config, a.dtype)
            print(f"wrote {export_single_file(a.ckpt, a.single_file, *args)}")
        if a.out is None:
            return
        if a.lora:
            from sdtrain.export_lora import export_lora

            args = (a.ema, a.pretrained, a.single_file_config)
            print("wrote", *export_lora(a.ckpt, a.out, *args))
            return
        out = export(a.ckpt, a.out, a.ema, a.pretrained, a.single_file_config)
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
