"""Which family a model is: `detect` reads a diffusers folder's model_index.json, or a single
file's keys, and returns its `sdtrain.models.family.Family` (SD or SDXL); `families()` lists
those sdtrain trains. Apart from the families themselves, so each imports only its base."""

from __future__ import annotations

import json
from pathlib import Path

from sdtrain.models.family import SD, Family

# Pipelines of families sdtrain cannot train yet: named, so the error says what the model is.
KNOWN = {
    "StableDiffusion3Pipeline": "SD3",
    "FluxPipeline": "Flux",
}


def families() -> dict[str, Family]:
    """Every family sdtrain trains, by its diffusers pipeline class."""
    from sdtrain.models.sdxl import SDXL

    return {f.pipeline_class: f for f in (SD, SDXL)}


def detect(pretrained: str | Path) -> Family:
    """The family of a diffusers folder (its model_index.json's `_class_name`) or of an
    original-layout single file (SDXL's holds `conditioner.embedders.`; SD-1.x / SD-2.x's
    `cond_stage_model.`)."""
    path = Path(pretrained).expanduser()
    index = path / "model_index.json"
    trained = families()
    if path.is_file():
        return trained["StableDiffusionXLPipeline"] if is_sdxl_file(path) else SD
    if not index.is_file():  # a folder without the index: the folder check names what lacks
        return SD
    name = json.loads(index.read_text()).get("_class_name", SD.pipeline_class)
    if name in trained:
        return trained[name]
    what = f"an {KNOWN[name]} model" if name in KNOWN else "a model"
    names = ", ".join(f"{f.description} ({p})" for p, f in trained.items())
    raise ValueError(
        f"model.pretrained: {index} names {name}: {what} of a family sdtrain does not train; "
        f"it trains {names}"
    )


def is_sdxl_file(path: Path) -> bool:
    """Whether a single file holds SDXL's conditioner (read from the header, no tensors)."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(k.startswith("conditioner.embedders.1.") for k in f.keys())
