"""Export a training checkpoint as a diffusers Stable Diffusion folder.

    sdtrain-export CKPT OUT [--no-ema] [--pretrained FOLDER] [--overwrite]
    sdtrain-export CKPT [OUT] --single-file FILE.safetensors [--dtype fp16|fp32]
    sdtrain-export CKPT OUT --lora [--no-ema]
    sdtrain-export CKPT OUT --embedding [--no-ema]

OUT loads with diffusers alone: StableDiffusionPipeline.from_pretrained(OUT). The U-Net gets the
EMA weights by default (--no-ema for the raw ones); VAE, text encoder, tokenizer and scheduler come
from the model folder the run trained with (recorded in the checkpoint; --pretrained if it moved).
--single-file writes one .safetensors in the original SD layout (AUTOMATIC1111, ComfyUI,
diffusers' from_single_file). A run that trained from a single file reloads it with the folder of
configs and tokenizer it recorded (model.single_file_config; --single-file-config if it moved).
A LoRA run (model.lora, any type of the family) exports with its adapters merged in; --lora writes
the adapters alone (`sdtrain.artifacts.export_lora`: kohya's file, and diffusers' for LoRA, LoCon and
DoRA).
A textual-inversion run (model.textual_inversion) exports a folder whose tokenizer holds the new
tokens and whose text encoder their rows (a single file keeps the original vocabulary: its
tokens travel as embedding files); --embedding writes one embedding file per token
(`sdtrain.artifacts.export_embedding`: AUTOMATIC1111, ComfyUI, diffusers' load_textual_inversion).
Nothing is overwritten unless --overwrite: OUT must be new or empty (--overwrite replaces a folder
holding an earlier export whole; a folder of other files is refused even then), FILE new; each is
written beside its target and renamed into place when complete (`sdtrain.artifacts.outputs`).
"""

from __future__ import annotations

from pathlib import Path

from sdtrain.artifacts import checkpoint
from sdtrain.artifacts.folder import save_folder
from sdtrain.artifacts.outputs import check_file, check_folder, new_file, new_folder
from sdtrain.models import lora, textual_inversion
from sdtrain.models.parts import Parts

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for
KOHYA_NAME = "pytorch_lora_weights_kohya.safetensors"  # the name diffusers' scripts give it
EMBEDDINGS_INDEX = "embeddings.json"  # --embedding's list of tokens and their files
# What a folder holding an earlier export has (a diffusers folder, --lora's or --embedding's
# files): --overwrite replaces such a folder, and no other.
EXPORTED = ("model_index.json", DIFFUSERS_NAME, KOHYA_NAME, EMBEDDINGS_INDEX)
EXPORT = "an export"


def export(
    ckpt_path: str | Path,
    out: str | Path,
    ema: bool = True,
    pretrained: str | Path | None = None,
    single_file_config: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the diffusers folder `out` from the checkpoint at `ckpt_path`; return `out`.

    `out` must be new or empty, or hold an earlier export and `overwrite` be set.
    """
    from sdtrain.models.parts import assemble_pipeline, load_scheduler
    from sdtrain.models.single_file import is_single_file

    out, parts = folder_parts(out, overwrite, ckpt_path, ema, pretrained, single_file_config)
    textual_inversion.merge(parts.text_encoder)  # new tokens: their rows in a larger vocabulary
    configs = parts.single_file_config if is_single_file(parts.pretrained) else parts.pretrained
    scheduler = sampler_for(load_scheduler(configs), parts.noise_scheduler)
    modules = (parts.vae, parts.text_encoder, parts.tokenizer, parts.unet, scheduler)
    pipe = assemble_pipeline(*modules, parts.family)
    with new_folder(out) as tmp:
        save_folder(pipe, tmp)
    return out


def folder_parts(
    out: str | Path, overwrite: bool, ckpt_path: str | Path, *source, fuse: bool = True
) -> tuple[Path, Parts]:
    """The export folder `out`, checked (new or empty, or an earlier export's with `overwrite`:
    `sdtrain.artifacts.outputs`), then the parts of the checkpoint at `ckpt_path`
    (`checkpoint_parts`; `source`: its ema, pretrained and single_file_config), in that order: a
    refused folder costs no checkpoint read."""
    out = check_folder(out, overwrite, EXPORTED, EXPORT)
    return out, checkpoint_parts(ckpt_path, *source, fuse=fuse)


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
    overwrite: bool = False,
) -> Path:
    """Write one original-layout .safetensors `out` (U-Net, VAE, text encoder); return `out`.

    An existing `out` is replaced only with `overwrite`.
    """
    out = check_file(out, overwrite, ".safetensors")
    parts = checkpoint_parts(ckpt_path, ema, pretrained, single_file_config)
    if textual_inversion.embeddings(parts.text_encoder):  # the original layout's vocabulary
        print("the single file keeps the original vocabulary: its new tokens are --embedding's")
        textual_inversion.drop(parts.text_encoder)
    save_single_file = parts.family.single_file_module().save_single_file  # the family's layout
    with new_file(out) as tmp:
        save_single_file(tmp, parts.unet, parts.vae, parts.text_encoder, dtype)
    return out


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
    adapters are merged into the base weights (`fuse`), or left as adapters (`sdtrain.artifacts.export_lora`);
    a trained text encoder gets its weights, a textual-inversion run's tokens their rows (kept
    apart: `sdtrain.models.textual_inversion.merge` or `drop` them to save the text encoder)."""
    from sdtrain.models.loader import load_parts
    from sdtrain.models.single_file import is_single_file

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
    tokens = run.get("textual_inversion")  # absent: older checkpoints
    frozen = tokens is not None and not tokens.get("train_unet")  # the folder's U-Net as it was
    unet_config = None if run.get("lora") or frozen else run["unet_config"]  # LoRA: the folder's
    parts = load_parts(
        folder,
        unet_config,
        run["prediction_type"],
        zero_terminal_snr=bool(run.get("zero_terminal_snr")),  # absent: older checkpoints
        single_file_config=single_file_config,
    )
    lora.add_recorded(parts, run.get("lora"))  # a LoRA run: adapters to load its weights into
    textual_inversion.add_recorded(parts, tokens)  # new tokens: rows to load the trained ones into
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
