"""The parts of a Stable Diffusion (U-Net, VAE, text encoder, tokenizer, noise scheduler), built,
and how each is read from a diffusers folder. The module never loads anything itself.

`sdtrain.models.loader.load_parts` puts them together from a folder or a single file; a LoRA
wrapper (`sdtrain.models.lora.load_parts`) is one more function that returns `Parts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrain.models.family import SD, Family
from sdtrain.models.tokens import load_tokenizer, tokenize  # noqa: F401 (their home before)

REQUIRED = SD.folders()  # what an SD-1.x/2.x diffusers folder holds


def check_folder(path: str | Path, need_unet: bool = True, family: Family = SD) -> Path:
    """Fail early, naming the folder and what is missing, if `path` is no diffusers folder of
    `family` (`sdtrain.models.loader.check_model_folder` also takes a single file)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model.pretrained: {path} is not a folder. Point it at a diffusers-format Stable "
            "Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), or make a tiny one "
            "with `sdtrain-tiny-model OUT`."
        )
    required = family.folders()
    needed = [p for p in required if need_unet or p != "unet"]
    missing = [p for p in needed if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model.pretrained: {path} lacks {', '.join(f'{p}/' for p in missing)}; point it at a "
            f"diffusers-format Stable Diffusion folder ({' '.join(f'{p}/' for p in required)}), "
            "or make a tiny one with `sdtrain-tiny-model OUT`"
        )
    return path


def load_tokenizers(path: str | Path):
    """The tokenizer of a diffusers folder, or the pair of an SDXL folder (its family's)."""
    from sdtrain.models.families import detect

    path = Path(path).expanduser()
    if path.is_dir() and (path / "tokenizer_2").is_dir() and detect(path).name == "sdxl":
        from sdtrain.models.sdxl import TokenizerPair

        return TokenizerPair(load_tokenizer(path), load_tokenizer(path / "tokenizer_2"))
    return load_tokenizer(path)


def load_frozen(path: str | Path):
    """VAE, text encoder, tokenizer and training noise scheduler from a diffusers folder (the text
    encoder and tokenizer of its family: a pair of each for SDXL)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from sdtrain.models.families import detect

    family = detect(path)
    path = check_folder(path, need_unet=False, family=family)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", low_cpu_mem_usage=False)
    text_encoder, tokenizer = family.load_text(path)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    return vae, text_encoder, tokenizer, scheduler


def load_scheduler(path: str | Path):
    """The model folder's own scheduler: the class its scheduler_config.json names, its config."""
    import diffusers

    path = Path(path).expanduser()
    config_file = path / "scheduler" / "scheduler_config.json"
    name = json.loads(config_file.read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{config_file}: _class_name {name!r} is no diffusers scheduler")
    return cls.from_pretrained(path, subfolder="scheduler")


@dataclass
class Parts:
    """The models a Stable Diffusion trains with, built.

    `unet` trains; `vae` and `text_encoder` are frozen by the module. `noise_scheduler` holds the
    training noise schedule and `prediction_type`. `pretrained` is the folder (or single file) the
    frozen parts came from (recorded in checkpoints, so export can reload them); None for parts
    built in memory. `single_file_config` is a single file's folder of configs and tokenizer
    (recorded too); None for a folder. `family` says what differs between model generations
    (`sdtrain.models.family`): the loader picks it from the model.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    pretrained: str | None = None
    single_file_config: str | None = None
    family: Family = SD


def check_resolution(folder: str | Path, resolution: int | None) -> None:
    """Refuse a training size the folder's VAE cannot encode whole (it would crop silently)."""
    if resolution is None or Path(folder).expanduser().is_file():  # a single file: no configs
        return
    cfg_file = Path(folder).expanduser() / "vae" / "config.json"
    blocks = json.loads(cfg_file.read_text()).get("block_out_channels", [0, 0, 0, 0])
    factor = 2 ** (len(blocks) - 1)
    if resolution % factor:
        lower, upper = resolution // factor * factor, (resolution // factor + 1) * factor
        raise ValueError(
            f"data.resolution={resolution} is not a multiple of {factor}, the downsampling factor "
            f"of the VAE in {cfg_file.parent}: use {lower or upper} or {upper}"
        )


def load_unet(path: str | Path, config: str | dict[str, Any] | None = None):
    """The U-Net: pretrained weights from `path`/unet, or fresh weights from `config`.

    Args:
        path: the diffusers model folder.
        config: None to load the pretrained U-Net; a dict of UNet2DConditionModel arguments or the
            path of a U-Net `config.json` to build one from scratch (pretraining).
    """
    from diffusers import UNet2DConditionModel

    if config is None:
        from sdtrain.models.families import detect

        path = check_folder(path, family=detect(path))
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet", low_cpu_mem_usage=False)
    if isinstance(config, str | Path):
        cfg_file = Path(config).expanduser()
        if not cfg_file.is_file():
            raise FileNotFoundError(f"model.unet_config: {cfg_file} is not a file")
        config = json.loads(cfg_file.read_text())
    return UNet2DConditionModel.from_config(dict(config))


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, family: Family = SD):
    """The family's diffusers pipeline over these modules (shared, not copied), no safety checker.

    `save_pretrained` on it writes the diffusers folder layout (model_index.json and one subfolder
    per part) that `from_pretrained` and every diffusers-based tool read.
    """
    return family.pipeline(vae, text_encoder, tokenizer, unet, scheduler)
