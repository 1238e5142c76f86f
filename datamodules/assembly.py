"""How a WebDataModule's stages are put together: shards -> samples -> batches -> DataLoader."""

from __future__ import annotations

import logging
from functools import partial

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from sdtrain.datamodules.buckets import BucketBatcher
from sdtrain.datamodules.decode import DecodeStage
from sdtrain.datamodules.heldout import HeldOut, heldout_transform
from sdtrain.datamodules.mixture import MixtureCollate
from sdtrain.datamodules.order import (
    Cursor,
    DataOrder,
    Endless,
    PositionStage,
    ResampledShardList,
    ShuffleStage,
)
from sdtrain.datamodules.passes import pass_stages
from sdtrain.datamodules.tars import TarSamples
from sdtrain.datamodules.transforms import Collate
from sdtrain.models.parts import load_tokenizers

log = logging.getLogger("sdtrain.datamodules.webdataset")  # where its messages always came from


class PipelineAssembly:
    """A mixin of `WebDataModule`. Needs from it: `hparams`, `urls`, `val_urls`, `buckets`,
    `mixture`, `remote`, `latent_cache_info`, `tokenizer`, `transform()`, `data_order()`,
    `batches_per_pass()` and `loader_workers()`; sets `order` and, for held-out data, `tokenizer`."""

    def pipeline(self, order: DataOrder | None = None) -> Endless:
        """Shards -> samples -> batches for one rank; `order` defaults to data_order()."""
        h = self.hparams
        order = self.data_order() if order is None else order
        cursor = Cursor(order)
        decode = DecodeStage(self.transform(), order)
        collate = Collate(self.tokenizer)
        mixed = None  # a mixture's raw samples, drawn from its sources by weight
        if self.mixture is not None:
            collate = MixtureCollate(collate, self.mixture.names)
            mixed = self.mixture.samples(
                order, cursor, decode.transform, decode.shard_error, h.shuffle_buffer,
                shared=not h.resampled, read=partial(TarSamples, settings=self.remote),
            )  # fmt: skip
        if h.resampled:  # each slot its own endless shard order, shuffle and batches
            read = [mixed] if mixed is not None else [
                ResampledShardList(self.urls, order, cursor),
                TarSamples(decode.shard_error, self.remote),
                ShuffleStage(h.shuffle_buffer, order, cursor),
            ]  # fmt: skip
            stages = [*read, PositionStage(cursor), decode, self.batcher(collate)]
        else:  # one stream a pass for all slots, batches formed once and dealt whole
            per_pass, size = self.batches_per_pass(), h.batch_size
            stages = pass_stages(
                self.urls, order, cursor, decode, collate, size, h.shuffle_buffer, per_pass,
                samples=None if mixed is None else [mixed], remote=self.remote,
            )  # fmt: skip
        slots = order.world_size * max(1, self.loader_workers(order.world_size))
        return Endless(wds.DataPipeline(*stages), cursor, order.rank, max(1000, 2 * slots))

    def batcher(self, collate):
        """Examples -> batches: `batch_size` in arrival order, or with buckets the first bucket
        to hold `batch_size` (one shape per batch; partial buckets wait for the next pass)."""
        if self.buckets is not None:
            return BucketBatcher(self.hparams.batch_size, collate)
        return wds.batched(self.hparams.batch_size, collation_fn=collate, partial=False)

    def train_dataloader(self) -> DataLoader:
        # read now: on resume the trainer has just restored its step and the data position
        order = self.order = self.data_order()
        log.info(
            "data order: seed %d, start step %d, rank %d of %d%s",
            order.seed,
            order.start_step,
            order.rank,
            order.world_size,
            ", continuing where the checkpoint left off" if order.resume else "",
        )
        workers = self.loader_workers(order.world_size, say=True)
        # a plain DataLoader, not wds.WebLoader (a pipeline around one): Lightning shuts the
        # persistent workers down when fit ends only if it can see the DataLoader; hidden in
        # WebLoader they lived on until garbage collection (5 s a worker; a sweep's trials piled up)
        return DataLoader(
            self.pipeline(order),
            batch_size=None,
            num_workers=workers,
            # persistent: each worker keeps its pipeline, and with it the pass counts
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # DataLoader refuses a start method when there are no worker processes
            multiprocessing_context=self.hparams.worker_start_method if workers > 0 else None,
        )

    def heldout_dataloader(self) -> HeldOut | None:
        """This rank's held-out batches for `sdtrain.training.validation` (None without held-out shards):
        read in order, centre-cropped, never flipped. Not named `val_dataloader`: the validation
        loss runs from a callback at optimizer steps, not in Lightning's val loop."""
        if not self.val_urls:
            return None
        if self.tokenizer is None:
            self.tokenizer = load_tokenizers(self.hparams.tokenizer)
        transform = heldout_transform(
            self.val_urls, self.hparams, self.latent_cache_info, self.remote
        )
        order = self.data_order()
        return HeldOut(
            self.val_urls,
            transform,
            Collate(self.tokenizer),
            self.hparams.batch_size,
            order.rank,
            order.world_size,
            self.remote,
        )
