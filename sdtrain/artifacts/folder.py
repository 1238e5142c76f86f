"""Write a diffusers model folder that every consumer reads whole.

transformers 5 saves a CLIP text encoder's weights without the `text_model.` level its keys had
until then (`embeddings.token_embedding.weight`, not `text_model.embeddings.token_embedding.weight`).
transformers reads either, but loaders that read the files themselves do not: ComfyUI's diffusers
loader left such a text encoder uninitialised (196 keys missing for SD-1.5), and transformers 4.x
loaded random weights with only a warning. `save_folder` writes the keys as the established
layout (every SD release on the Hub) has them.
"""

from __future__ import annotations

import json
from pathlib import Path

TEXT_MODEL = "text_model."
CLIP_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def save_folder(pipe, out: str | Path) -> Path:
    """`pipe.save_pretrained(out)`, with every CLIP text encoder's keys in the established layout."""
    out = Path(out)
    pipe.save_pretrained(out)
    for config in sorted(out.glob("*/config.json")):
        architectures = json.loads(config.read_text()).get("architectures") or []
        if any(a in CLIP_TEXT_CLASSES for a in architectures):
            established_text_encoder_keys(config.parent)
    return out


def established_key(key: str) -> str:
    """`embeddings...`/`encoder...`/`final_layer_norm...` under `text_model.`; a projection
    (CLIPTextModelWithProjection's `text_projection.weight`) stays where it is."""
    if key.startswith(TEXT_MODEL) or key.startswith("text_projection."):
        return key
    return TEXT_MODEL + key


def established_text_encoder_keys(folder: Path) -> int:
    """Rename the keys of the text encoder's weight files in `folder` (and of their index, if the
    weights are sharded) to the established layout; returns how many keys were renamed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    renamed = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {established_key(k): f.get_tensor(k) for k in f.keys()}
            renamed += sum(k != established_key(k) for k in f.keys())
        save_file(tensors, str(file), metadata=metadata)
    for index in folder.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {established_key(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return renamed
