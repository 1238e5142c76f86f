"""Export a textual-inversion run's tokens as embedding files (`sdtrain-export CKPT OUT --embedding`).

`OUT/<token>.safetensors` for each token of `model.textual_inversion.tokens` (`<my-thing>` ->
`my-thing.safetensors`, the name AUTOMATIC1111 triggers it by), holding its trained rows,
(vectors, D) in fp32:

- SD-1.x/2.x: `emb_params` (the key kohya-ss writes; AUTOMATIC1111 and ComfyUI read a file's one
  tensor, diffusers' `load_textual_inversion(FILE, token=...)` too);
- SDXL: `clip_l` (the first text encoder's rows, 768 wide) and `clip_g` (the second's, 1280), as
  AUTOMATIC1111 and ComfyUI read SDXL embeddings; diffusers loads each into its own encoder:
  `pipe.load_textual_inversion(f["clip_g"], token=..., text_encoder=pipe.text_encoder_2,
  tokenizer=pipe.tokenizer_2)` and `f["clip_l"]` with `pipe.text_encoder` / `pipe.tokenizer`.

`OUT/embeddings.json` lists each token with its file and vector count. EMA rows by default
(`ema=False`: the raw ones).
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtrain.artifacts.export import EMBEDDINGS_INDEX, folder_parts
from sdtrain.artifacts.outputs import new_folder
from sdtrain.models import textual_inversion


def export_embedding(
    ckpt_path: str | Path,
    out: str | Path,
    ema: bool = True,
    pretrained: str | Path | None = None,
    single_file_config: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write one embedding file per token of the checkpoint's run into the folder `out` (new or
    empty, or an earlier export's with `overwrite`: `sdtrain.artifacts.outputs`); return them."""
    from safetensors.torch import save_file

    source = (ema, pretrained, single_file_config)
    out, parts = folder_parts(out, overwrite, ckpt_path, *source, fuse=False)
    files = textual_inversion.embedding_files(parts.text_encoder)
    if not files:
        raise ValueError(
            f"{ckpt_path}: the run trained no textual inversion (model.textual_inversion was "
            "null); export it without --embedding"
        )
    names = {token: textual_inversion.file_name(token) for token in files}
    clash = [t for t in names if list(names.values()).count(names[t]) > 1]
    if clash:
        raise ValueError(f"tokens {clash} would share the file name {names[clash[0]]}")
    index = {
        token: {"file": names[token], "vectors": next(iter(rows.values())).shape[0]}
        for token, rows in files.items()
    }
    with new_folder(out) as tmp:
        for token, rows in files.items():
            save_file(rows, tmp / names[token])
        (tmp / EMBEDDINGS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [out / name for name in names.values()]
