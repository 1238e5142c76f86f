"""WebDataset LightningDataModule: image-text tar shards -> batches of pixels and token ids, or a
latent cache (sdtrain-cache-latents output) -> batches of VAE posterior moments and token ids."""

from __future__ import annotations

from functools import partial

import lightning as L

from sdtrain.datamodules.assembly import PipelineAssembly
from sdtrain.datamodules.buckets import BucketTransform, parse_buckets
from sdtrain.datamodules.captions import caption_processor
from sdtrain.datamodules.decode import DecodeStage  # noqa: F401  (re-exported: sdtrain.artifacts.cache)
from sdtrain.datamodules.heldout import split_heldout
from sdtrain.datamodules.masks import check_mode, with_masks
from sdtrain.datamodules.mixture import Mixture, MixtureTransform, parse_sources
from sdtrain.datamodules.order import DataOrder  # part of this module's API too
from sdtrain.datamodules.remote import RemoteSettings
from sdtrain.datamodules.resuming import ResumableOrder
from sdtrain.datamodules.sources import (  # noqa: F401  (re-exported: this module's API)
    CACHE_FILE,
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    check_shard_kind,
    expand_shards,
    read_latent_cache,
)
from sdtrain.datamodules.survey import (
    Survey,
    batches_per_pass,
    loader_workers,
    plan_buckets,
    survey_shards,
)
from sdtrain.datamodules.transforms import MAX_IMAGE_PIXELS, ImageTextTransform, LatentTransform
from sdtrain.models.parts import load_tokenizers


def check_counts(
    batch_size: int,
    num_workers: int,
    shuffle_buffer: int,
    resolution: int | None,
    max_image_pixels: int | None,
) -> None:
    """Refuse a size or count that is not a whole number of at least its least, naming its key."""
    for key, value, least in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("shuffle_buffer", shuffle_buffer, 0),
        ("resolution", 8 if resolution is None else resolution, 8),
        ("max_image_pixels", 1 if max_image_pixels is None else max_image_pixels, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"data.{key}={value!r} must be a whole number >= {least}")


class WebDataModule(ResumableOrder, PipelineAssembly, L.LightningDataModule):
    """Streams image-text samples from WebDataset shards (img2dataset layout works as is), or
    VAE posterior moments from a latent cache (a folder sdtrain-cache-latents wrote).

    Here: its settings, the shards and their survey, the transform for them. Beside it:
    `resuming.ResumableOrder` (rank, start step, resume point: the data order) and
    `assembly.PipelineAssembly` (the stages, the DataLoader, the held-out batches).

    A latent cache is recognised by the cache.json beside its shards, so the same
    `data.train_shards` key names either kind; `latent_cache_info` holds the parsed file (None for
    image shards), for the module to check the cache against its VAE (sdtrain.artifacts.cache).

    Args:
        train_shards: url pattern(s), brace-expandable, local paths or anything webdataset opens;
            None when `sources` names them.
        tokenizer: the model folder (its tokenizer/ subfolder) or a tokenizer folder.
        resolution: square training size in pixels. With a latent cache it must be the cache's,
            or None to take the cache's.
        center_crop: centre crop after resizing; False crops at random. A latent cache was
            cropped when it was made (cache.json says how); this is not used for it.
        random_flip: flip left-right with probability 0.5 (off by default: a mirrored glyph,
            text or asymmetric subject no longer matches its caption). A latent cache holds
            unflipped images, so True is refused for one.
        batch_size: per device.
        global_batch_size: the global batch `batch_size` was derived from, or None; recorded
            only (with the checkpoint's hyperparameters): `sdtrain.training.batching` derives
            `batch_size` and the trainer's accumulation from it before this is built.
        max_batch_size_per_device: the per-device cap of that derivation; recorded only.
        num_workers: DataLoader worker processes.
        shuffle_buffer: samples held for shuffling (per worker).
        resampled: every rank and worker walks all the shards forever, each shard once per round
            in its own seeded order (best for large data sets and many GPUs); False reads the
            shards in one new order every pass, forms the pass's batches once and deals them
            out to the ranks and workers, so each sample is drawn once a pass whatever the
            shard count (`datamodules.passes`; every worker reads every shard).
        seed: base seed for shard order and shuffling, which also depend on the rank, the
            DataLoader worker, the pass over the shards and the step the run starts from (see
            DataOrder): a resumed run draws new data rather than replaying its first steps.
        worker_start_method: how DataLoader workers start ("fork", "spawn", "forkserver"); None
            keeps Python's default (fork on Linux up to 3.13, forkserver from 3.14).
        latent_cache: None reads whichever kind the shards are; True requires a latent cache
            and False image shards, so a config meant for one fails on the other at setup
            rather than skipping every sample.
        allow_pipe: let `train_shards` hold "pipe:CMD" urls, which run CMD in a shell.
        remote: how shards named by url (https://, s3://, gs://, ...) are read: retries,
            backoff, timeouts, an S3-compatible endpoint (`datamodules.remote.RemoteSettings`);
            None: the defaults.
        max_image_pixels: skip (as `too_large`) images with more pixels, read from the header
            before decoding; None: no limit but Pillow's decompression-bomb check.
        val_shards: held-out shards for the validation loss (`heldout_dataloader`), or None.
        val_split_shards: hold out the last this many of `train_shards` instead (0: none).
        caption_template, shuffle_tags, keep_tags, tag_separator: rewrite each caption as it
            loads (`datamodules.captions.CaptionProcessor`); refused for a cache of contexts.
        buckets: aspect-ratio buckets (`datamodules.buckets`): None (square `resolution` crops),
            "auto" (derived from `resolution`, `bucket_step`, `bucket_max_aspect`) or a list of
            [width, height]; every batch then has one bucket's shape. Refused for a latent cache.
        bucket_step: the multiple every bucket side is of (64 for SD: VAE 8 x U-Net 8).
        bucket_max_aspect: the longest side at most this times the shortest ("auto" only).
        sources: a weighted mixture of shard sets instead of `train_shards`: a list of
            {name, shards, weight, caption_template?} (`datamodules.mixture`); None: none.
        mask: a loss mask per sample (`datamodules.masks`): None, "file" (KEY.mask.png) or
            "alpha" (the image's alpha channel); from a latent cache, the masks it stores.
    """

    mixture_class = Mixture  # data.sources; DreamBooth's draws its two in a fixed turn

    def __init__(
        self,
        train_shards: str | list[str],
        tokenizer: str,
        resolution: int | None = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        batch_size: int = 16,
        global_batch_size: int | None = None,
        max_batch_size_per_device: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
        worker_start_method: str | None = None,
        latent_cache: bool | None = None,
        allow_pipe: bool = False,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        val_shards: str | list[str] | None = None,
        val_split_shards: int = 0,
        caption_template: str | None = None,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        tag_separator: str = ",",
        buckets: str | list[list[int]] | None = None,
        bucket_step: int = 64,
        bucket_max_aspect: float = 2.0,
        sources: list[dict] | None = None,
        remote: dict | None = None,
        mask: str | None = None,
    ) -> None:
        super().__init__()
        check_counts(batch_size, num_workers, shuffle_buffer, resolution, max_image_pixels)
        check_mode(mask)
        self.save_hyperparameters()
        self.remote = RemoteSettings.of(remote)
        self.buckets = parse_buckets(buckets, resolution, bucket_step, bucket_max_aspect)
        caption_args = (caption_template, shuffle_tags, keep_tags, tag_separator)
        self.captions = caption_processor(*caption_args)
        self._read_shards(
            train_shards, sources, allow_pipe, val_shards, val_split_shards, caption_args
        )
        self.survey = self.survey_data()
        self.tokenizer = None
        self._rank: tuple[int, int] | None = None  # (rank, world size) from set_rank
        self._start_step: int | None = None  # from set_start_step
        self._resume: dict | None = None  # a checkpoint's data position (resume_at)
        self.order: DataOrder | None = None  # the order of the last train_dataloader()

    def _read_shards(
        self, train_shards, sources, allow_pipe: bool, val_shards, val_split_shards: int,
        caption_args: tuple,
    ) -> None:  # fmt: skip
        """Set `mixture` (`data.sources`, or None), `urls`, `val_urls`, `latent_cache_info` and
        a mixture's `source_captions` (rewritten per `caption_args`)."""
        expand = partial(expand_shards, allow_pipe=allow_pipe, remote=self.remote)
        mixed = parse_sources(sources, train_shards, expand)
        read_cache = partial(read_latent_cache, remote=self.remote)
        self.mixture = None if mixed is None else self.mixture_class(mixed, read_cache)
        if self.mixture is None:
            self.urls = expand_shards(train_shards, allow_pipe, self.remote)
        else:
            self.urls = self.mixture.urls
            if val_split_shards:
                raise ValueError(
                    f"data.val_split_shards={val_split_shards} holds out the last shards of "
                    "data.train_shards; a mixture (data.sources) names its held-out shards in "
                    "data.val_shards"
                )
        self.urls, self.val_urls = split_heldout(
            self.urls, val_shards, val_split_shards, allow_pipe, self.remote
        )
        if self.mixture is None:
            self.latent_cache_info = read_latent_cache(self.urls, self.remote)
        else:
            self.latent_cache_info = self.mixture.latent_cache_info()
            self.source_captions = self.mixture.captions(*caption_args)

    @property
    def bucketed(self) -> bool:
        """Whether batches are of aspect-ratio buckets (image shards with data.buckets set)."""
        return self.buckets is not None and self.latent_cache_info is None

    def survey_data(self) -> Survey | None:
        """A small local set's samples, read before anything starts (`datamodules.survey`):
        shards without a usable sample are refused, buckets of fewer images than a batch
        dropped (`buckets.merge_small_buckets`). None for a large or remote set."""
        h = self.hparams
        if self.mixture is not None:
            found = self.mixture.survey(self.bucketed, h.max_image_pixels)
        else:
            found = survey_shards(self.urls, self.bucketed, h.max_image_pixels)
        if found is not None and self.bucketed:
            self.buckets = plan_buckets(self.buckets, found, h.batch_size)
        return found

    def batches_per_pass(self) -> int | None:
        """The batches a pass makes under `data.resampled=false` (None: unknown, as for a
        mixture, whose pass ends when its last source runs out)."""
        if self.mixture is not None:
            return None
        buckets = self.buckets if self.bucketed else None
        return batches_per_pass(self.survey, buckets, self.hparams.batch_size)

    def loader_workers(self, world_size: int, say: bool = False) -> int:
        """data.num_workers, but under data.resampled=false no more than this rank's share of a
        pass's batches (`survey.loader_workers`); `say` logs it when fewer."""
        h = self.hparams
        if h.resampled:
            return h.num_workers
        per_pass = self.batches_per_pass()
        return loader_workers(h.num_workers, per_pass, world_size, self.survey, h.batch_size, say)

    def setup(self, stage: str | None = None) -> None:
        self.check_shard_kind()
        if self.tokenizer is None:
            self.tokenizer = load_tokenizers(self.hparams.tokenizer)

    def check_shard_kind(self) -> None:
        """Refuse settings the shards cannot honour (`sources.check_shard_kind`). Checked at
        setup, not in __init__, so the config can be built (and tested) before a cache exists."""
        if self.mixture is not None:
            self.mixture.check_kind(self.hparams, self.buckets)
        else:
            check_shard_kind(self.hparams, self.latent_cache_info, self.urls, self.buckets)
        if self.latent_cache_info is not None:
            self.transform()  # refuses caption options a cache of text contexts cannot honour

    def transform(self) -> ImageTextTransform | LatentTransform | MixtureTransform:
        """Raw sample -> example for these shards: decode and crop an image, or load latents;
        for a mixture, by each source's own transform (its captions, its cache)."""
        if self.mixture is not None:
            return self.mixture.transform(self.source_transform, self.source_captions)
        return self.source_transform(self.captions, self.latent_cache_info)

    def source_transform(self, captions, info: dict | None) -> ImageTextTransform | LatentTransform:
        """The transform of shards whose captions `captions` rewrites (or None), of a latent
        cache described by `info` (its cache.json) or of images (None); with masks per
        `data.mask` (`datamodules.masks.with_masks`)."""
        return with_masks(self._source_transform(captions, info), self.hparams.mask, info)

    def _source_transform(
        self, captions, info: dict | None
    ) -> ImageTextTransform | LatentTransform:
        h = self.hparams
        if info is None:  # images: at one resolution, or in the bucket of their aspect ratio
            images = ImageTextTransform if self.buckets is None else BucketTransform
            size = h.resolution if self.buckets is None else self.buckets
            flags = (h.center_crop, h.random_flip)
            return images(size, *flags, max_pixels=h.max_image_pixels, captions=captions)
        files, shape = info["files"], info["latent_shape"]
        return LatentTransform(files, info["dtype"], shape, captions)
