"""Single-file Stable Diffusion checkpoints: the original (CompVis / Stability) key layout.

AUTOMATIC1111, ComfyUI and most model hubs trade one `.safetensors` holding the U-Net
(`model.diffusion_model.*`), the VAE (`first_stage_model.*`) and the text encoder
(`cond_stage_model.*`: OpenAI CLIP for SD-1.x, OpenCLIP for SD-2.x) under the names of the original
LDM code. This module writes that layout from diffusers models (`to_original`, `save_single_file`)
and reads it back into `sdtrain.models.parts.Parts` (`load_single_file`).

Reading goes through diffusers' own converter (`StableDiffusionPipeline.from_single_file`), with a
local diffusers-format folder for the configs and the tokenizer (`model.single_file_config`), so
nothing is fetched. Writing inverts the same mappings (diffusers' `single_file_utils`), as tables of
prefix renames plus the two reshapes the layouts differ by: the VAE mid-block attention (1x1 convs
there, linear layers here) and the OpenCLIP attention (one fused q/k/v projection there).
SDXL's layout (`sdtrain.models.single_file_sdxl`) is written and read with the same tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The layouts' top-level prefixes.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD-1.x: OpenAI CLIP ViT-L/14, transformers' names
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD-2.x: OpenCLIP ViT-H/14, its own names

# diffusers -> original, inside one U-Net / VAE ResNet block.
UNET_RESNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
# diffusers -> original, inside the VAE's mid-block attention (linear there, 1x1 conv here).
VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
UNET_TOP = (
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
    # SDXL: the pooled text + size/crop embedding (`addition_embed_type: text_time`)
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
)
VAE_TOP = (
    ("encoder.conv_norm_out.", "encoder.norm_out."),
    ("decoder.conv_norm_out.", "decoder.norm_out."),
)
# diffusers CLIPTextModel -> OpenCLIP, per transformer layer and outside the layers.
OPENCLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
PICKLES = (".ckpt", ".pt", ".pth", ".bin")  # torch pickles: refused, loading one can run code
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for new, old in table:
        key = key.replace(new, old)
    return key


def unet_block_prefixes(config: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is a ResNet) for every block of a U-Net of `config`.

    The original U-Net numbers its blocks flat: `input_blocks.k` holds a ResNet (`.0`) and maybe an
    attention (`.1`), `layers_per_block` of them per level plus one downsampler between levels;
    `output_blocks.k` the same with one more layer per level and the upsampler last in its block.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"unet layers_per_block={layers!r}: the original layout needs one integer")
    per_level = layers + 1  # original blocks per level: the layers plus the down/upsampler slot
    levels = len(config["block_out_channels"])
    out: list[tuple[str, str, bool]] = []
    for i in range(levels):
        for j in range(layers):
            k = per_level * i + j + 1
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False))
        if i < levels - 1:
            k = per_level * (i + 1)
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op.", False))
        for j in range(per_level):
            k = per_level * i + j
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True))
            out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False))
        if i < levels - 1:
            k = per_level * i + layers
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1  # after the attention
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{k}.{slot}.", False))
    out.append(("mid_block.attentions.0.", "middle_block.1.", False))
    out += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True) for j in range(2)]
    return out


def unet_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """diffusers UNet2DConditionModel weights -> `model.diffusion_model.*` (same tensors)."""
    blocks = unet_block_prefixes(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, UNET_TOP) if key.startswith(tuple(p for p, _ in UNET_TOP)) else None
        for hf, sd, resnet in blocks if new is None else ():
            if key.startswith(hf):
                rest = key[len(hf) :]
                new = sd + (_rename(rest, UNET_RESNET) if resnet else rest)
                break
        if new is None:
            raise KeyError(f"U-Net weight {key!r} has no place in the original SD layout")
        out[UNET_PREFIX + new] = value
    return out


def vae_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL weights -> `first_stage_model.*`; the decoder's levels run reversed."""
    levels = len(config["block_out_channels"])
    table: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
    for i in range(levels):
        up = levels - 1 - i  # diffusers' up_blocks.0 is the original's up.<last>
        table += [
            (f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", VAE_RESNET),
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", ()),
            (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{up}.block.", VAE_RESNET),
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", ()),
        ]
    for part in ("encoder", "decoder"):
        table += [
            (f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", VAE_RESNET)
            for j in range(2)
        ]
        table.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION))
    out = {}
    for key, value in state.items():
        new = _rename(key, VAE_TOP)
        for hf, sd, inner in table:
            if key.startswith(hf):
                new = sd + _rename(key[len(hf) :], inner)
                break
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # (out, in) linear -> (out, in, 1, 1) conv
        out[VAE_PREFIX + new] = value
    return out


def _text_key(key: str) -> str:
    """transformers' CLIPTextModel keys, with or without its `text_model.` level (>= 5.6 drops it)."""
    return key.removeprefix("text_model.")


def clip_to_original(state: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, Any]:
    """OpenAI CLIP: the keys stay transformers' own, under `prefix` (SD-1.x's
    `cond_stage_model.transformer.`; SDXL's first encoder is `conditioner.embedders.0.transformer.`)."""
    return {f"{prefix}text_model.{_text_key(k)}": v for k, v in state.items()}


def openclip_names(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """transformers CLIP keys -> OpenCLIP's (no prefix), q/k/v fused into one in_proj; the
    projection of a CLIPTextModelWithProjection (SDXL's second encoder) as `text_projection`."""
    state = {_text_key(k): v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, Any] = {}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        hf, sd = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):  # OpenCLIP's nn.MultiheadAttention: one (3D, D) in_proj
            qkv = [state.pop(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{sd}attn.in_proj_{kind}"] = torch.cat(qkv)
        for key in [k for k in state if k.startswith(hf)]:
            out[sd + _rename(key[len(hf) :], OPENCLIP_LAYER)] = state.pop(key)
    for hf, sd in OPENCLIP_TOP.items():
        out[sd] = state.pop(hf)
    projection = state.pop("text_projection.weight", None)  # transformers' Linear: (proj, width)
    if projection is not None:  # OpenCLIP applies x @ P: P is (width, proj), the transpose
        out["text_projection"] = projection.T
    if state:
        raise KeyError(
            f"text encoder weights {sorted(state)[:3]} have no place in OpenCLIP's layout"
        )
    return out


def openclip_to_original(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """SD-2.x: transformers CLIP keys -> OpenCLIP's (`cond_stage_model.model.*`), q/k/v fused."""
    out = openclip_names(state)
    layers = sorted({int(k.split(".")[2]) for k in out if k.startswith("transformer.resblocks.")})
    # SD-2 checkpoints hold one resblock more than SD conditions on (it reads the penultimate
    # layer's output; diffusers' text encoder stops there, 23 of OpenCLIP's 24): write it as the
    # established converters do, a copy of the last one, which no conditioning reads. Loaders that
    # expect all 24 (ComfyUI) then find every weight; diffusers skips it.
    last, extra = f"transformer.resblocks.{layers[-1]}.", f"transformer.resblocks.{layers[-1] + 1}."
    for key in [k for k in out if k.startswith(last)]:
        out[extra + key[len(last) :]] = out[key].clone()
    # SD conditions on the token states, never on the pooled projection: an identity keeps the key
    # OpenCLIP loaders expect, and diffusers reads the q/k/v split width from its shape.
    width = out["ln_final.weight"].shape[0]
    out["text_projection"] = torch.eye(width, dtype=out["ln_final.weight"].dtype)
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}


def text_layout(text_encoder) -> str:
    """The text encoder's layout: `openclip` for SD-2.x's (OpenCLIP uses exact GELU), else `clip`."""
    return "openclip" if text_encoder.config.hidden_act == "gelu" else "clip"


def to_original(unet, vae, text_encoder, layout: str | None = None) -> dict[str, torch.Tensor]:
    """The three models' weights under the original SD names (tensors shared, not copied).

    Args:
        layout: "clip" (SD-1.x) or "openclip" (SD-2.x) for the text encoder; None infers it.
    """
    layout = layout or text_layout(text_encoder)
    if layout not in ("clip", "openclip"):
        raise ValueError(
            f"text encoder layout {layout!r}; use 'clip' (SD-1.x) or 'openclip' (SD-2.x)"
        )
    text = text_encoder.state_dict()
    out = unet_to_original(unet.state_dict(), dict(unet.config))
    out.update(vae_to_original(vae.state_dict(), dict(vae.config)))
    out.update(clip_to_original(text) if layout == "clip" else openclip_to_original(text))
    return out


def save_single_file(
    path: str | Path, unet, vae, text_encoder, dtype: str = "fp16", layout: str | None = None
) -> Path:
    """Write the models as one original-layout `.safetensors` at `path` (fp16 halves the size)."""
    return write_single_file(path, to_original(unet, vae, text_encoder, layout), dtype)


def write_single_file(
    path: str | Path, original: dict[str, torch.Tensor], dtype: str = "fp16"
) -> Path:
    """Write weights under their original names as one `.safetensors` of `dtype` at `path`."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single-file checkpoint is written as .safetensors")
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in original.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def is_single_file(path: str | Path) -> bool:
    """Whether `model.pretrained` names a single checkpoint file rather than a diffusers folder."""
    path = Path(path).expanduser()
    return path.is_file() or path.suffix in (".safetensors", *PICKLES)


def check_single_file(path: str | Path) -> Path:
    """Accept a `.safetensors` file; refuse pickled `.ckpt` / `.pt` files (loading one runs code)."""
    path = Path(path).expanduser()
    if path.suffix in PICKLES:
        raise ValueError(
            f"model.pretrained: {path} is a pickle ({path.suffix}): loading one can run any code it "
            "holds. Convert it once, where you trust it, to .safetensors (e.g. with diffusers' "
            "from_single_file + save_pretrained) and point model.pretrained at that"
        )
    if path.suffix != ".safetensors":
        raise ValueError(
            f"model.pretrained: {path} is neither a model folder nor a .safetensors file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: {path} is not a file")
    return path


def check_config_folder(config: str | Path | None, path: str | Path, family=None) -> Path:
    """The diffusers-format folder whose configs and tokenizer a single file loads with: what
    `family` (None: the file's, `sdtrain.models.family.detect`) needs, SDXL's second text
    encoder and tokenizer included."""
    from sdtrain.models.families import detect

    family = family or detect(path)
    models = ("unet", "vae", *family.text_encoders)
    if config is None:
        folders = " ".join(f"{m}/" for m in models)
        tokenizers = " ".join(f"{t}/" for t in family.tokenizers)
        raise ValueError(
            f"model.single_file_config is not set: {path} is a single file, which holds weights "
            "only; point model.single_file_config at a diffusers-format folder of the same model "
            f"type (model_index.json, {folders} configs, {tokenizers}, scheduler/)"
        )
    config = Path(config).expanduser()
    need = ["model_index.json", *(f"{m}/config.json" for m in models), *family.tokenizers]
    need += ["scheduler/scheduler_config.json"]
    missing = [n for n in need if not (config / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"model.single_file_config: {config} lacks {', '.join(missing)} (a diffusers-format "
            "folder of configs and tokenizer is needed to load a single file)"
        )
    return config


def load_single_file(path: str | Path, config: str | Path | None, unet=None):
    """Parts from an original-layout `.safetensors`, configs and tokenizer from `config`.

    Args:
        path: the single file.
        config: a diffusers-format folder of the same model type (configs and tokenizer; its
            weights, if any, are not read).
        unet: a U-Net to use instead of the file's (a fresh one, for pretraining).
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from sdtrain.models.family import SD
    from sdtrain.models.parts import Parts

    path, config = check_single_file(path), check_config_folder(config, path, SD)
    pipe = read_pipeline(
        StableDiffusionPipeline,
        path,
        config,
        ("unet", "vae", "text_encoder"),
        unet,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    scheduler = DDPMScheduler.from_pretrained(config, subfolder="scheduler")
    return Parts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, str(path))


def read_pipeline(pipeline_class, path: Path, config: Path, models, unet=None, **kwargs):
    """`pipeline_class.from_single_file(path)` with `config`'s configs (nothing fetched), and
    every one of `models` read whole from the file (float32); a weight the file lacks raises
    KeyError naming the file. `unet`: one to use instead of the file's."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    extra = {} if unet is None else {"unet": unet}
    try:
        pipe = pipeline_class.from_single_file(
            str(path), config=str(config), local_files_only=True, **kwargs, **extra
        )
    except (NotImplementedError, SingleFileComponentError) as e:  # a weight left on "meta"
        raise KeyError(
            f"{path}: lacks weights that the configs in {config} need (an incomplete file, or "
            f"another model type than those configs): {str(e).strip().splitlines()[0]}"
        ) from e
    for name in models:
        model = getattr(pipe, name)
        empty = [n for n, p in model.named_parameters() if p.is_meta]  # weights the file lacked
        if empty:
            raise KeyError(f"{path}: no weights for {name}.{empty[0]} (and {len(empty) - 1} more)")
        model.float()
    return pipe
