"""Encode image-text shards once with the frozen VAE (and text encoder): a latent cache to train on.

One device:        sdtrain-cache-latents /data/mine/ /data/mine-latents --pretrained /models/sd15 --resolution 512
GPUs on one node:  sdtrain-cache-latents /data/mine/ /data/mine-latents --pretrained /models/sd15 --devices 8
torchrun:          torchrun --nproc_per_node 8 -m sdtrain.cli.cache_latents /data/mine/ /data/mine-latents --pretrained /models/sd15 --devices 8
Train on it:       sdtrain-train data=latents data.train_shards=/data/mine-latents model.pretrained=/models/sd15

It runs as `Trainer.predict`, the launch training uses. Each rank reads its share of the source
shards once (split by rank, then by DataLoader worker, in order: no shuffling, no resampling),
decodes and crops every image with the training transform (centre crop, never flipped) and writes
its own shards, `OUT/{rank:02d}-{n:05d}.tar`, holding per sample:

  KEY.latent_dist.npy       (2C, h, w) float16: the VAE posterior's mean and log-variance,
                            diffusers' `latent_dist.parameters` (unscaled, unclamped)
  KEY.latent_dist.bf16.npy  the same with --dtype bf16: bfloat16 bit patterns in a uint16 array
                            (numpy has no bfloat16); `torch.from_numpy(a).view(torch.bfloat16)`
  KEY.context.npy           (77, D) float16: the family's context, the text encoder's last
                            hidden states (SDXL: both encoders' penultimate ones, D = 2048)
                            (--text only)
  KEY.pooled.npy            (P,) float16: SDXL's pooled text embedding (--text on SDXL only)
  KEY.mask.npy              (1, h, w) float16: the loss mask on the latent grid, area-averaged
                            from the pixel mask cropped with its image (--mask file|alpha only;
                            `sdtrain.datamodules.masks`)
  KEY.txt                   the caption
  KEY.json                  original_size [w, h] as decoded, resized_size, crop_box [left, top,
                            right, bottom] in resized pixels, flipped (always false): what SDXL's
                            size conditioning (time_ids) is made of when it trains on the cache

Arrays are plain `.npy`, read with `np.load(allow_pickle=False)`: a shard holds data, never code.
After every rank has finished, rank 0 writes `OUT/cache.json` (what made the cache and what it
holds). It comes last, so a folder with a cache.json is a complete cache. Training checks the
cache's VAE fingerprint against its own model (`cache_check.check_latent_cache`).

SDXL folders cache as SD ones do (the family is read from model_index.json): its two text
encoders are one module (`sdtrain.models.sdxl.TextEncoderPair`), fingerprinted together.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

import sdtrain
from sdtrain.artifacts.cache_check import (  # noqa: F401  (re-exported: this module's API)
    TEXT_CONFIG_KEYS,
    check_latent_cache,
    check_size_record,
    first_crop_record,
    open_shard,
    text_encoder_fingerprint,
    vae_fingerprint,
)
from sdtrain.datamodules import batch as B
from sdtrain.datamodules.masks import CACHE_EXT, latent_mask, with_masks
from sdtrain.datamodules.order import SplitByRank, SplitByWorker
from sdtrain.datamodules.remote import RemoteSettings
from sdtrain.datamodules.tars import TarSamples
from sdtrain.datamodules.transforms import Collate, ImageTextTransform
from sdtrain.datamodules.webdataset import (
    CACHE_FILE,
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    DecodeStage,
)
from sdtrain.models.family import SD, Family

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LATENT_FILES = {"fp16": "latent_dist.npy", "bf16": "latent_dist.bf16.npy"}  # by --dtype
# the text conditioning by batch key, always fp16: the context, and SDXL's pooled embedding
TEXT_FILES = {B.CONTEXT: "context.npy", B.POOLED: "pooled.npy"}


def text_shapes(text_encoder, tokenizer) -> dict[str, list[int]]:
    """The cached text tensors' shapes per sample: {"context": [L, D]} and, for a text encoder
    with a pooled output (SDXL's `TextEncoderPair`, its `pooled_dim`), {"pooled": [P]}."""
    length = tokenizer.model_max_length  # 77 for CLIP: the ids are padded to it
    if hasattr(text_encoder, "pooled_dim"):
        return {B.CONTEXT: [length, text_encoder.context_dim], B.POOLED: [text_encoder.pooled_dim]}
    return {B.CONTEXT: [length, text_encoder.config.hidden_size]}


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def to_storage(t: torch.Tensor, dtype: str, what: str, keys: list[str]) -> np.ndarray:
    """(B, ...) tensor -> numpy in `dtype` ("bf16": bit patterns as uint16); refuses inf or NaN."""
    t = t.detach().to("cpu", DTYPES[dtype])
    if not torch.isfinite(t).all():
        raise ValueError(
            f"{what} of the batch with keys {keys[:3]}... is not finite in {dtype}"
            + (" (fp16 overflows above 65504: use --dtype bf16)" if dtype == "fp16" else "")
        )
    return (t.view(torch.uint16) if dtype == "bf16" else t).numpy()


class ShardSink:
    """Writes samples to `OUT/{rank:02d}-{n:05d}.tar`, a new shard every `per_shard` samples.

    The first shard opens with the first sample, so a rank without data leaves no empty shard.
    """

    def __init__(self, out: Path, rank: int, per_shard: int) -> None:
        self.pattern = str(out / f"{rank:02d}-%05d.tar")
        self.per_shard = per_shard
        self.writer: wds.ShardWriter | None = None
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self.writer is None:
            self.writer = wds.ShardWriter(self.pattern, maxcount=self.per_shard, verbose=0)
        self.writer.write(sample)
        self.count += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _skip_shard(exn: Exception) -> bool:
    """A source shard that could not be read (to its end): warn, and go on with the next."""
    log.warning("skipped the rest of shard %s: %s", exn.args[-1], exn.args[0])
    return True


class CacheCollate(Collate):
    """Collate, keeping each example's crop record ("meta") for its .json."""

    def __call__(self, examples: list[dict]) -> dict:
        return super().__call__(examples) | {"meta": [e["meta"] for e in examples]}


class LatentEncoder(L.LightningModule):
    """The `Trainer.predict` system: each rank encodes its share of the shards into its own shards.

    Args:
        vae, text_encoder, tokenizer: the frozen parts (`sdtrain.models.parts.load_frozen`).
        urls: the source shards, every rank's.
        out: the cache folder.
        recipe: what goes into cache.json besides what the run finds out (samples, shards,
            fingerprints, shapes).
        batch_size, num_workers, samples_per_shard: as the command line says.
        family: the model family (how captions become contexts).
        remote: how remote source shards are read (`datamodules.remote.RemoteSettings`).
    """

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        urls: list[str],
        out: Path,
        recipe: dict[str, Any],
        batch_size: int = 32,
        num_workers: int = 4,
        samples_per_shard: int = 1000,
        family: Family = SD,
        remote: RemoteSettings | None = None,
    ) -> None:
        super().__init__()
        self.family = family  # how captions become contexts (models/family.py)
        self.vae = vae.requires_grad_(False).eval()
        # no text encoder on the device unless contexts are cached
        self.text_encoder = text_encoder.requires_grad_(False).eval() if recipe["text"] else None
        self.tokenizer, self.urls, self.out, self.recipe = tokenizer, urls, out, recipe
        self.batch_size, self.num_workers = batch_size, num_workers
        self.samples_per_shard = samples_per_shard
        self.remote = remote  # how remote source shards are read (datamodules/remote.py)
        self.files = {B.LATENT_DIST: LATENT_FILES[recipe["dtype"]]}  # batch key -> extension
        self.storage = {B.LATENT_DIST: recipe["dtype"]}  # batch key -> dtype
        self.text_shapes = text_shapes(text_encoder, tokenizer) if recipe["text"] else {}
        for key in self.text_shapes:  # context, and SDXL's pooled embedding
            self.files[key], self.storage[key] = TEXT_FILES[key], "fp16"
        if recipe.get("mask"):  # the latent-grid loss mask (data.mask)
            self.files[B.MASK], self.storage[B.MASK] = CACHE_EXT, "fp16"
        self.sink: ShardSink | None = None

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.global_rank, self.trainer.world_size
        transform = ImageTextTransform(
            self.recipe["resolution"], center_crop=True, random_flip=False, with_meta=True
        )
        transform = with_masks(transform, self.recipe.get("mask"), None)  # --mask
        pipe = wds.DataPipeline(
            wds.SimpleShardList(self.urls),  # in order, once
            SplitByRank(rank, world),
            SplitByWorker(),
            TarSamples(_skip_shard, self.remote),
            DecodeStage(transform),
            wds.batched(self.batch_size, collation_fn=CacheCollate(self.tokenizer), partial=True),
        )
        workers = min(self.num_workers, len(self.urls[rank::world]))  # a worker per shard at most
        return DataLoader(pipe, batch_size=None, num_workers=workers)

    def on_predict_start(self) -> None:
        # every rank looks before any rank writes (the barrier), so all of them fail alike
        if any(self.out.glob("*.tar")) or (self.out / CACHE_FILE).exists():
            raise FileExistsError(
                f"OUT {self.out} already holds shards or a {CACHE_FILE}; choose an empty folder"
            )
        self.trainer.strategy.barrier("cache-start")
        self.sink = ShardSink(self.out, self.global_rank, self.samples_per_shard)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        keys = batch[B.KEYS]
        pixels = batch[B.PIXELS].to(self.vae.dtype)  # (B, 3, H, W) in [-1, 1]
        tensors = {B.LATENT_DIST: self.vae.encode(pixels).latent_dist.parameters}  # (B, 2C, h, w)
        if self.text_encoder is not None:  # (B, 77, D) context; SDXL's (B, P) pooled too
            cond = self.family.condition(self.text_encoder, batch[B.INPUT_IDS])
            tensors.update({key: cond[key] for key in self.text_shapes})
        if B.MASK in self.files:  # (B, 1, H, W) pixel mask -> (B, 1, h, w), area-averaged
            tensors[B.MASK] = latent_mask(batch[B.MASK], tensors[B.LATENT_DIST].shape[-2:])
        arrays = {
            self.files[k]: to_storage(t, self.storage[k], k, keys) for k, t in tensors.items()
        }
        for i, key in enumerate(keys):
            sample = {ext: npy_bytes(a[i]) for ext, a in arrays.items()}
            sample["txt"] = batch[B.CAPTIONS][i].encode("utf-8")
            sample["json"] = json.dumps(batch["meta"][i]).encode()
            self.sink.write({"__key__": key, **sample})

    def on_predict_end(self) -> None:
        self.sink.close()
        count = torch.tensor(self.sink.count, device=self.device)
        total = int(self.trainer.strategy.reduce(count, reduce_op="sum"))
        self.trainer.strategy.barrier("cache-end")  # every rank's shards are closed
        if self.trainer.is_global_zero:
            write_cache_json(self.out, self.cache_info(total))

    def cache_info(self, samples: int) -> dict[str, Any]:
        """cache.json: what made the cache (recipe, fingerprints) and what it holds."""
        cfg = self.vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)  # VAE downsampling: 8 for SD
        side = self.recipe["resolution"] // factor
        info = {
            "format": CACHE_FORMAT,
            "format_version": CACHE_FORMAT_VERSION,
            "sdtrain_version": sdtrain.__version__,
            **self.recipe,
            "center_crop": True,
            "random_flip": False,
            "vae_fingerprint": vae_fingerprint(self.vae),
            "vae_scaling_factor": cfg.scaling_factor,
            "latent_shape": [2 * cfg.latent_channels, side, side],
            "text_encoder_fingerprint": None,
            "context_shape": self.text_shapes.get(B.CONTEXT),
            "pooled_shape": self.text_shapes.get(B.POOLED),
            "files": self.files,
            "samples": samples,
            "shards": sorted(p.name for p in self.out.glob("*.tar")),
        }
        if self.text_encoder is not None:
            info["text_encoder_fingerprint"] = text_encoder_fingerprint(self.text_encoder)
        return info


def write_cache_json(out: Path, info: dict[str, Any]) -> None:
    """Write cache.json through a temporary file: it appears whole or not at all."""
    tmp = out / f"{CACHE_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out / CACHE_FILE)
