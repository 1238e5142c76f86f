"""Whether a latent cache fits this model: VAE and text-encoder fingerprints, SDXL's size record."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from typing import Any

import torch

from sdtrain.datamodules.remote import RemoteSettings, is_remote, open_remote
from sdtrain.datamodules.sources import CACHE_FILE
from sdtrain.datamodules.transforms import CROP_RECORD
from sdtrain.models.families import detect
from sdtrain.models.family import SD, Family

log = logging.getLogger("sdtrain.artifacts.cache")  # where its messages always came from

# The text encoder's config keys that change its output; the rest (transformers_version, dtype,
# return_dict, ...) differ between library versions for the same model.
TEXT_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
)


def _fingerprint(config: dict[str, Any], model: torch.nn.Module) -> str:
    """sha256 over `config` (sorted JSON) and every weight's name, shape and bytes.

    Floating weights are hashed as fp32, so one folder's weights loaded in fp16 or fp32 agree.
    """
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).numpy())
    return h.hexdigest()


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's class, config (scaling_factor included) and weights.

    Diffusers' bookkeeping keys (`_name_or_path`, `_diffusers_version`, ...) are left out: the
    same VAE copied to another folder keeps its fingerprint.
    """
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return _fingerprint({"class": type(vae).__name__, **config}, vae)


def _text_config(model) -> dict[str, Any]:
    """A CLIP text model's class and the config keys that shape its output."""
    return {"class": type(model).__name__} | {
        k: getattr(model.config, k, None) for k in TEXT_CONFIG_KEYS
    }


def text_encoder_fingerprint(text_encoder) -> str:
    """sha256 of the text encoder's class, the config keys that shape its output, and weights;
    for SDXL's `TextEncoderPair`, of both encoders' (the weights named te1.…, te2.…)."""
    if hasattr(text_encoder, "config"):  # one CLIP text model: the hash SD caches record
        return _fingerprint(_text_config(text_encoder), text_encoder)
    parts = {name: _text_config(m) for name, m in text_encoder.named_children()}
    return _fingerprint({"class": type(text_encoder).__name__, **parts}, text_encoder)


def open_shard(url: str):
    """A shard of a latent cache, local or remote, as a binary stream."""
    return open_remote(url, RemoteSettings()) if is_remote(url) else open(url, "rb")


def first_crop_record(info: dict[str, Any]) -> dict[str, Any] | None:
    """The first readable KEY.json of a latent cache, its shards read in cache.json's order
    (None if no shard holds one): the cache's samples all come with the same record."""
    for shard in info.get("shards") or []:
        try:
            with (
                open_shard(f"{info['folder']}/{shard}") as f,
                tarfile.open(fileobj=f, mode="r|") as tar,
            ):
                for member in tar:
                    if member.name.endswith(".json"):
                        record = json.loads(tar.extractfile(member).read())
                        return record if isinstance(record, dict) else {}
        except (OSError, tarfile.TarError, ValueError):  # a broken shard: training skips it too
            continue
    return None


def check_size_record(info: dict[str, Any], model: str, model_folder: str | None) -> None:
    """Refuse a latent cache whose samples do not record the original size and crop that SDXL's
    size conditioning (time_ids) is made of: training would stop at its first step. `model`
    names the model for the message."""
    record = first_crop_record(info)
    if record is None or not all(k in record for k in CROP_RECORD):
        found = "no KEY.json" if record is None else f"a KEY.json of {sorted(record)}"
        raise ValueError(
            f"latent cache {info.get('folder')} does not record each image's original size and "
            f"crop ({', '.join(CROP_RECORD)} in KEY.json; its first sample has {found}), which "
            f"the {model} conditions on (time_ids). Cache again with "
            f"`sdtrain-cache-latents SRC OUT --pretrained {model_folder}`, or train on the "
            "image shards."
        )


def check_latent_cache(
    info: dict[str, Any],
    vae,
    text_encoder=None,
    model_folder: str | None = None,
    family: Family | None = None,
) -> None:
    """Refuse a latent cache that this model's VAE (and text encoder, if it holds contexts) did
    not make: another VAE's latents are another latent space, and training on them would run
    without error and learn the wrong thing. For a family with size conditioning (SDXL), refuse
    a cache whose samples lack the original size and crop it needs (`check_size_record`).

    Args:
        info: the cache's parsed cache.json (`WebDataModule.latent_cache_info`).
        vae: the model's VAE.
        text_encoder: the model's text encoder (checked when the cache holds contexts).
        model_folder: where the model came from, for the message.
        family: the model's family; None reads it from `model_folder` (SD if there is none).

    Raises:
        ValueError: naming the cache folder and the fingerprint it records, and the model folder
            and the fingerprint of its part; or naming what an SDXL cache lacks.
    """
    checks = [("VAE", "vae_fingerprint", vae, vae_fingerprint)]
    if info.get("text"):
        checks.append(
            ("text encoder", "text_encoder_fingerprint", text_encoder, text_encoder_fingerprint)
        )
    for what, key, part, fingerprint in checks:
        ours = None if part is None else fingerprint(part)
        if info.get(key) != ours:
            raise ValueError(
                f"latent cache {info.get('folder')} was made with the {what} of "
                f"{info.get('pretrained')} ({what} fingerprint {info.get(key)}, {CACHE_FILE}), "
                f"but this run's model {model_folder} has {what} fingerprint {ours}. Cache again "
                f"with `sdtrain-cache-latents SRC OUT --pretrained {model_folder}`, or train on "
                "the image shards."
            )
        log.info("latent cache %s: %s fingerprint %s matches", info.get("folder"), what, ours)
    family = family or (detect(model_folder) if model_folder else SD)
    if getattr(family, "SIZE_KEYS", ()):  # SDXL: time_ids from each sample's size and crop
        check_size_record(info, f"{family.description} model {model_folder}", model_folder)
