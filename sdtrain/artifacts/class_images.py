"""Class images for DreamBooth's prior preservation: drawn once by the base model, kept as shards.

    folder = ensure_class_images(ClassImages("a photo of a dog", 200, 512), "/cache/class_images",
                                 pretrained="/models/sd15")

DreamBooth (Ruiz et al. 2023, section 3.3) keeps a fine-tune from forgetting what its class looks
like by training, beside the subject's few images, on images the model itself drew for the class
prompt. They are drawn here with sdtrain's own sampling (`sdtrain.artifacts.sample`: the family's
diffusers pipeline, one seed per image, so image i is the same whatever the batch) and written as
WebDataset shards by `sdtrain.artifacts.shards` (caption: the class prompt), with `manifest.json`.

A set is kept in `cache_dir/<key>/`, the key a hash of everything that decides its images: the
model's files (their bytes: a copied folder keeps its key, a retrained one gets a new key), the
prompt, the number of images, the resolution, the first seed, the sampler, its steps, the guidance
scale and the dtype. A second run, a resumed run or a sweep trial with the same settings reads the
shards back; a changed setting draws a new set beside the old. A file lock makes one process draw
a set while others (DDP ranks, parallel sweep trials) wait for it; the set is written to a hidden
sibling folder and renamed into place, so a killed run never leaves a half-made set.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERSION = 1  # bump when the layout of a set changes: older sets are drawn again
# the files a model folder's images depend on (SDXL's second encoder and tokenizer included)
MODEL_FOLDERS = (
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)
CHUNK = 1 << 20  # bytes read at a time while hashing


@dataclass(frozen=True)
class ClassImages:
    """What to draw: `num_images` images of `prompt` at `resolution` px, seeds `seed`, `seed` + 1, ...

    `batch_size` and `device` change how fast, not what: they are not part of the key.
    """

    prompt: str
    num_images: int
    resolution: int
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 5.0
    sampler: str = "ddim"
    dtype: str = "fp32"
    batch_size: int = 8
    device: str = "auto"  # auto: cuda when there is one

    def check(self) -> None:
        """Refuse a bad setting, naming its `data.dreambooth.` key and value."""
        from sdtrain.artifacts.sample import DTYPES

        for key, least in (("num_images", 1), ("resolution", 8), ("steps", 1), ("batch_size", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(
                    f"data.dreambooth.class_images.{key}={value!r} must be a whole number >= {least}"
                )
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(
                f"data.dreambooth.class_images.prompt={self.prompt!r} must be a non-empty text"
            )
        if self.dtype not in DTYPES:
            raise ValueError(
                f"data.dreambooth.class_images.dtype={self.dtype!r}; use one of {sorted(DTYPES)}"
            )

    def recipe(self) -> dict:
        """The settings that decide the images (the key's part besides the model)."""
        out = asdict(self)
        del out["batch_size"], out["device"]
        return out


def model_fingerprint(pretrained: str | Path, single_file_config: str | Path | None = None) -> str:
    """sha256 over the bytes of the files the model's images depend on, by their relative names:
    a diffusers folder's part folders (`MODEL_FOLDERS`), or a single file (and its config folder)."""
    h = hashlib.sha256()
    for root in (pretrained, single_file_config):
        if root is None:
            continue
        root = Path(root).expanduser()
        if root.is_file():
            files = [(root.name, root)]
        else:
            parts = [root / p for p in MODEL_FOLDERS if (root / p).is_dir()]
            if not parts:
                raise FileNotFoundError(f"model.pretrained: {root} holds none of {MODEL_FOLDERS}")
            found = (f for part in parts for f in part.rglob("*") if f.is_file())
            files = sorted((f.relative_to(root).as_posix(), f) for f in found)
        for name, path in files:
            h.update(f"{name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as fh:
                while block := fh.read(CHUNK):
                    h.update(block)
    return h.hexdigest()


def set_key(spec: ClassImages, fingerprint: str) -> str:
    """The folder name of a set: a hash of the model's fingerprint and the recipe."""
    blob = json.dumps({"version": VERSION, "model": fingerprint, **spec.recipe()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_manifest(folder: Path) -> dict | None:
    """A finished set's manifest.json, or None when the folder holds no finished set."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    shards = [folder / s for s in manifest.get("shards", [])]
    return manifest if shards and all(s.is_file() for s in shards) else None


def ensure_class_images(
    spec: ClassImages,
    cache_dir: str | Path,
    pretrained: str | Path,
    single_file_config: str | Path | None = None,
) -> Path:
    """The folder of `spec`'s class images as shards, drawn by the model `pretrained` unless a
    finished set of the same key is there already (then nothing is drawn).

    Returns:
        `cache_dir/<key>/`, holding `00000.tar`, ... and manifest.json (the recipe, the model's
        path and fingerprint, the shards, how long drawing took).
    """
    spec.check()
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(pretrained, single_file_config)
    folder = cache_dir / set_key(spec, fingerprint)
    with (cache_dir / f".{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process draws; the others wait and read it back
        if read_manifest(folder) is not None:
            log.info("class images: %d of %r reused from %s", spec.num_images, spec.prompt, folder)
            return folder
        log.info("class images: drawing %d of %r with %s", spec.num_images, spec.prompt, pretrained)
        draw_set(spec, folder, pretrained, single_file_config, fingerprint)
    return folder


def fill_class_shards(data: Any) -> None:
    """Set `data.dreambooth.class_shards` (a config's `data` node, DreamBooth's) to the class
    images `data.dreambooth.class_images` describes, drawn now or found again; nothing to do
    without DreamBooth, with class_shards set, or with class_per_batch 0."""
    d = data.get("dreambooth") if isinstance(data, Mapping) else None
    if not isinstance(d, Mapping) or d.get("class_shards") or d.get("class_per_batch", 1) == 0:
        return
    spec = d.get("class_images")
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"data.dreambooth.class_images={spec!r} must be a map of prompt, num_images, "
            "resolution, ... (or set data.dreambooth.class_shards)"
        )
    try:
        images = ClassImages(**spec)
    except TypeError as e:
        raise ValueError(f"data.dreambooth.class_images: {e}") from None
    for key in ("cache_dir", "pretrained"):
        if not d.get(key):
            raise ValueError(f"data.dreambooth.{key}={d.get(key)!r} is needed to draw class images")
    folder = ensure_class_images(
        images, d["cache_dir"], d["pretrained"], d.get("single_file_config")
    )
    d["class_shards"] = str(folder)


def draw_set(spec, folder: Path, pretrained, single_file_config, fingerprint: str) -> None:
    """Draw the images, write them as shards with a manifest in a hidden sibling, rename it in."""
    import time

    from sdtrain.artifacts.shards import write_shards

    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        images = tmp / "images"
        images.mkdir()
        for i, img in enumerate(draw(spec, pretrained, single_file_config)):
            img.save(images / f"{i:06d}.png")
            (images / f"{i:06d}.txt").write_text(spec.prompt)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the pipeline's blocks back to the driver before training
        shards = write_shards(images, tmp / "shards", samples_per_shard=1000, shuffle=False)
        for shard in shards:
            shard.rename(tmp / shard.name)
        shutil.rmtree(images)
        (tmp / "shards").rmdir()
        manifest = {
            "version": VERSION,
            "recipe": spec.recipe(),
            "pretrained": str(pretrained),
            "model_fingerprint": fingerprint,
            "shards": [s.name for s in shards],
            "seconds": round(time.monotonic() - start, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if folder.exists():  # an unfinished set of an older sdtrain, or one without its shards
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def draw(spec: ClassImages, pretrained, single_file_config=None):
    """The set's images in seed order, `spec.batch_size` per pipeline call, drawn by the model's
    own family pipeline (`sdtrain.artifacts.sampling`)."""
    from sdtrain.artifacts.sample import DTYPES, Settings, sample
    from sdtrain.artifacts.sampling import build_pipeline
    from sdtrain.models.loader import load_parts

    device = spec.device
    if device == "auto":  # this process's GPU under DDP or torchrun (LOCAL_RANK), else the first
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    p = load_parts(pretrained, single_file_config=single_file_config)
    modules = (p.vae, p.text_encoder, p.tokenizer, p.unet, p.noise_scheduler)
    pipe = build_pipeline(*modules, spec.sampler, family=p.family).to(device)
    if spec.dtype != "fp32":
        pipe.to(dtype=DTYPES[spec.dtype])
    seeds = [spec.seed + i for i in range(spec.num_images)]
    step = max(spec.batch_size, spec.num_images // 10)  # a log line about every 10%
    for at in range(0, len(seeds), step):
        chunk = seeds[at : at + step]
        settings = Settings(
            [spec.prompt], chunk, spec.steps, spec.guidance_scale, spec.sampler,
            spec.resolution, spec.resolution, spec.batch_size,
        )  # fmt: skip
        yield from sample(pipe, settings)
        log.info("class images: %d/%d", at + len(chunk), spec.num_images)
