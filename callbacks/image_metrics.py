"""CLIP score and FID of images sampled with the EMA weights, every N steps and at the end.

    sdtrain-train "callbacks=[default,image_metrics]" callbacks.image_metrics.clip_model=CLIP_DIR \
        callbacks.image_metrics.fid_reference=HELD_OUT callbacks.image_metrics.inception_weights=PTH

Both metrics are torchmetrics' (`CLIPScore`, `FrechetInceptionDistance`), so their sums are
gathered across ranks before `compute`. Nothing is downloaded: CLIP is a local transformers folder,
FID's network torch-fidelity's Inception weights file or any feature `nn.Module` from config. A
metric whose path is null or missing is off for the whole run, said once in a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from sdtrain.artifacts.sampling import generate
from sdtrain.callbacks.periodic import EveryNSteps
from sdtrain.callbacks.sampling import eager

log = logging.getLogger(__name__)

KEY = "callbacks.image_metrics"  # config keys in messages: callbacks.image_metrics.<name>


def held_out(source: str) -> Iterator[tuple[bytes, str]]:
    """(image bytes, caption) of held-out samples, in order, from WebDataset shards (a brace
    pattern, a glob or a folder of `*.tar`) or a folder of captioned images (as sdtrain-shards
    reads one: `.txt` beside each image or a metadata file). Unreadable samples are skipped."""
    import webdataset as wds

    from sdtrain.artifacts.shards import captioned_images
    from sdtrain.datamodules.sources import expand_shards
    from sdtrain.datamodules.tars import TarSamples
    from sdtrain.datamodules.transforms import SkipSample, find_caption, find_image

    folder = Path(source).expanduser()
    if folder.is_dir() and not any(folder.glob("*.tar")):
        for path, caption, *_ in captioned_images(folder, allow_missing=True):  # (.., size)
            yield path.read_bytes(), caption
        return
    # No node or worker splitter: every rank reads the stream and keeps its own share.
    read = TarSamples(_unreadable)  # remote shards streamed as training streams them
    samples = wds.DataPipeline(wds.SimpleShardList(expand_shards(source)), read)
    for sample in samples:
        try:
            image = find_image(sample)
        except SkipSample:
            continue
        try:
            caption = find_caption(sample)
        except SkipSample:
            caption = ""
        yield image, caption


def _unreadable(exn: Exception) -> bool:
    """A reference shard that cannot be read stops the metric: its statistics would be off."""
    raise RuntimeError(f"{KEY}.fid_reference: {exn.args[-1]}: {exn.args[0]}")


def reference_problem(source: str | None) -> str | None:
    """Why the held-out set `source` cannot be read (naming the key), or None when it can."""
    if not source:
        return f"{KEY}.fid_reference is null"
    if "://" in source or Path(source).expanduser().is_dir():
        return None  # remote shards: webdataset opens them when read
    from sdtrain.datamodules.sources import expand_shards

    try:
        expand_shards(source)
    except (FileNotFoundError, ValueError) as e:
        why = str(e).split(": ", 1)[-1]  # expand_shards names data.train_shards: drop that
        return f"{KEY}.fid_reference={source} does not exist ({why})"
    return None


def to_uint8(images: list[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8, each fitted (centre crop, Lanczos) to `size` (w, h)."""
    if size is not None:
        images = [ImageOps.fit(i.convert("RGB"), size, Image.Resampling.LANCZOS) for i in images]
    arr = np.stack([np.asarray(i.convert("RGB"), dtype=np.uint8) for i in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class _TensorFeatures(nn.Module):
    """A CLIPModel whose get_{image,text}_features return the embeddings as a tensor.

    transformers 5 returns an output object (embeddings in `pooler_output`), which torchmetrics'
    CLIPScore (1.9) normalizes as if it were the tensor that transformers 4 returned.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score_metric(folder: str):
    """torchmetrics' CLIPScore over the transformers CLIP folder `folder` (never downloaded)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{KEY}.clip_model={folder}: not a CLIP model folder ({first})") from e
        return _TensorFeatures(model.eval()), processor

    return CLIPScore(model_name_or_path=load)


def fid_metric(feature: nn.Module | None, inception_weights: str | None):
    """torchmetrics' FID on `feature` (a module), else on Inception-v3 with local weights."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature is not None:
        return FrechetInceptionDistance(feature=feature.eval(), reset_real_features=False)
    return FrechetInceptionDistance(
        feature=2048, reset_real_features=False, feature_extractor_weights_path=inception_weights
    )


def fid_off_reason(feature: nn.Module | None, inception_weights: str | None) -> str | None:
    """Why FID has no network here (naming the key), or None when it has one."""
    if feature is not None:
        return None
    if not inception_weights:
        return f"{KEY}.inception_weights is null (and no fid_feature)"
    if not Path(inception_weights).expanduser().is_file():
        return f"{KEY}.inception_weights={inception_weights} does not exist"
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception-v3 lives there)
    except ImportError:
        return f"{KEY}.inception_weights needs torch-fidelity (pip install torch-fidelity)"
    return None


def shares(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's indices of `n` items (every world-th) and how many to pad them to, so that all
    ranks run the sampler the same number of times (FSDP's collective forwards need that)."""
    mine = list(range(rank, n, world))
    return mine, math.ceil(n / world)


class ImageMetrics(EveryNSteps):
    """Logs `val/clip_score` and `val/fid` of images sampled with fixed seeds (EMA weights).

    Every rank samples its share of the images (every world-th prompt; a rank-0-only forward
    would hang under FSDP) and adds them to the metrics, whose `compute` sums the shares of all
    ranks; rank 0 logs. FID's real side (up to `num_reference` held-out images, fitted to the
    sampled size) is read once, at the first round, and kept.

    Args:
        every_n_steps: measure after every this many optimizer steps (0: only at the end).
        prompts: the prompts, cycled to `num_images` (None: the held-out captions).
        num_images: images sampled per round (FID is biased by it: compare equal counts).
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        seed: image i uses seed + i.
        height: image height in pixels (None: the model's default).
        width: image width in pixels (None: the model's default).
        sampler: "ddim", "euler" or "dpm++".
        use_ema: sample with the EMA weights when available.
        batch_size: prompts per sampler call (and images per metric update).
        clip_model: a local transformers CLIP folder (None or missing: no CLIP score).
        fid_reference: held-out images: shards (pattern, glob, folder of .tar) or an image folder.
        num_reference: held-out images read for FID's real side (None: all).
        inception_weights: torch-fidelity's Inception-v3 weights file
            (weights-inception-2015-12-05-6726825d.pth; needs `pip install torch-fidelity`).
        fid_feature: a feature network for FID instead (uint8 (N, 3, H, W) -> (N, D)).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        prompts: list[str] | None = None,
        num_images: int = 64,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        sampler: str = "ddim",
        use_ema: bool = True,
        batch_size: int = 8,
        clip_model: str | None = None,
        fid_reference: str | None = None,
        num_reference: int | None = 1000,
        inception_weights: str | None = None,
        fid_feature: nn.Module | None = None,
    ) -> None:
        if num_images < 2:
            raise ValueError(f"{KEY}.num_images={num_images}: FID needs at least 2 images")
        if batch_size < 1:
            raise ValueError(f"{KEY}.batch_size={batch_size}: must be at least 1")
        if prompts is not None and not prompts:
            raise ValueError(f"{KEY}.prompts is empty (null: the held-out images' captions)")
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts) if prompts else None
        self.num_images = num_images
        self.kwargs = dict(
            steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width
        )
        self.seed, self.sampler, self.use_ema, self.batch_size = seed, sampler, use_ema, batch_size
        self.clip_model, self.fid_reference = clip_model, fid_reference
        self.num_reference = num_reference
        self.inception_weights, self.fid_feature = inception_weights, fid_feature
        self.clip = self.fid = None  # the torchmetrics metrics that are on (set up once)
        self.round_prompts: list[str] | None = None  # image i's prompt
        self._set_up = self._reference_added = False
        self.last_round: int | None = None  # step of the last round (checkpointed)
        self.last: dict[str, float] = {}  # the last round's values

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Decide once per run which metrics are on; a missing path warns once (rank 0)."""
        if stage != "fit" or self._set_up:
            return
        self._set_up = True
        warn = log.warning if trainer.is_global_zero else lambda *args: None
        ref_problem = reference_problem(self.fid_reference)
        if self.prompts is None and ref_problem:
            warn(
                "%s and prompts is null: nothing to sample, no image metrics this run", ref_problem
            )
            return
        self.round_prompts = self._prompts()
        clip = Path(self.clip_model).expanduser() if self.clip_model else None
        if clip is None:
            warn("%s.clip_model is null: no val/clip_score this run", KEY)
        elif not clip.is_dir():
            warn("%s.clip_model=%s does not exist: no val/clip_score this run", KEY, clip)
        else:
            self.clip = clip_score_metric(str(clip))
        fid_problem = ref_problem or fid_off_reason(self.fid_feature, self.inception_weights)
        if fid_problem:
            warn("%s: no val/fid this run", fid_problem)
        else:
            self.fid = fid_metric(self.fid_feature, self.inception_weights)

    def _prompts(self) -> list[str]:
        """`num_images` prompts: the configured ones, or the held-out captions, cycled."""
        source = self.prompts
        if source is None:
            source = [
                caption for _, caption in islice(held_out(self.fid_reference), self.num_images)
            ]
            if not source:
                raise ValueError(f"{KEY}.fid_reference={self.fid_reference} holds no images")
        return [source[i % len(source)] for i in range(self.num_images)]

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(trainer, pl_module)

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample this rank's share, update the metrics, compute them (all ranks), log (rank 0)."""
        step = self.last_round = trainer.global_step
        if self.clip is None and self.fid is None:
            return {}
        images, prompts = self._sample(trainer, pl_module)  # (n, 3, H, W) uint8, this rank's
        metrics = {}
        if self.clip is not None:
            self.clip.to(pl_module.device)
            if len(images):
                self.clip.update(images, prompts)
            metrics["val/clip_score"] = float(self.clip.compute())
            self.clip.reset()
            self.clip.to("cpu")  # CLIP ViT-L/14 holds ~1.7 GB: give it back to training
        if self.fid is not None:
            self.fid.to(pl_module.device)
            if not self._reference_added:
                self._add_reference(trainer, images.shape[-1], images.shape[-2], pl_module.device)
            if len(images):
                self.fid.update(images, real=False)
            metrics["val/fid"] = float(self.fid.compute())
            self.fid.reset()  # the fake side only (reset_real_features=False)
            self.fid.to("cpu")
        self.last = metrics
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=step)
        return metrics

    def _sample(self, trainer, pl_module) -> tuple[torch.Tensor, list[str]]:
        """This rank's images (uint8 on the module's device) and their prompts."""
        prompts = self.round_prompts
        mine, per_rank = shares(len(prompts), trainer.global_rank, trainer.world_size)
        padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))  # same calls per rank
        pipe = pl_module.pipeline(self.sampler)
        was_training = pl_module.training
        pl_module.eval()
        images: list[Image.Image] = []
        try:
            weights = pl_module.ema_weights() if self.use_ema else nullcontext()
            with pl_module.frozen_on_device(), weights, eager():  # offloaded VAE, text encoder in
                for start in range(0, len(padded), self.batch_size):
                    idx = padded[start : start + self.batch_size]
                    seeds = [self.seed + i for i in idx]
                    images += generate(pipe, [prompts[i] for i in idx], seeds=seeds, **self.kwargs)
        finally:
            pl_module.train(was_training)
        if not mine:
            return torch.empty(0, 3, 1, 1, dtype=torch.uint8), []
        return to_uint8(images[: len(mine)]).to(pl_module.device), [prompts[i] for i in mine]

    def _add_reference(self, trainer, width: int, height: int, device: torch.device) -> None:
        """FID's real side: this rank's share of the held-out images, fitted to width x height."""
        from sdtrain.datamodules.transforms import SkipSample, decode_image

        rank, world = trainer.global_rank, trainer.world_size
        batch: list[Image.Image] = []
        count = 0
        samples = islice(held_out(self.fid_reference), self.num_reference)
        for i, (data, _) in enumerate(samples):
            if i % world != rank:
                continue
            try:
                batch.append(decode_image(data))
            except SkipSample:
                continue
            if len(batch) == self.batch_size:
                self.fid.update(to_uint8(batch, (width, height)).to(device), real=True)
                count, batch = count + len(batch), []
        if batch:
            self.fid.update(to_uint8(batch, (width, height)).to(device), real=True)
            count += len(batch)
        if world == 1 and count < 2:
            raise ValueError(f"{KEY}.fid_reference={self.fid_reference}: FID needs 2+ images")
        self._reference_added = True
