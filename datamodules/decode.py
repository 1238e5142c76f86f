"""The pipeline stage that turns raw WebDataset samples into examples, skipping unusable ones."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator

from sdtrain.datamodules.order import DataOrder
from sdtrain.datamodules.tars import ShardFailed
from sdtrain.datamodules.transforms import ImageTextTransform, LatentTransform, SkipSample
from sdtrain.runtime.seeds import derive_seed

log = logging.getLogger("sdtrain.datamodules.webdataset")  # where its warnings always came from


class DecodeStage:
    """Pipeline stage: apply `transform`, skipping unusable samples, counted by kind.

    Each example carries {kind: count} of the samples skipped since the previous one; the counts
    live on the stage, so skips at the end of one pass over the shards reach the next pass's
    examples. `shard_error` is the tar reader's handler: a truncated or unreadable shard counts as
    one `bad_shard` and the stream goes on.
    """

    def __init__(
        self, transform: ImageTextTransform | LatentTransform, order: DataOrder | None = None
    ) -> None:
        self.transform = transform
        self.order = order
        self.pending: Counter[str] = Counter()
        self.pending_shards: Counter[str] = Counter()  # the same by shard url

    def shard_error(self, exn: Exception) -> bool:
        """The tar reader's handler (`datamodules.tars.TarSamples`): count a `bad_shard`."""
        self.pending["bad_shard"] += 1
        # the url is the exception's last string argument (ShardFailed; webdataset's errors too)
        urls = [a for a in exn.args if isinstance(a, str) and not a.startswith("<")]
        url = urls[-1] if urls else "unknown shard"
        self.pending_shards[url] += 1
        why = exn.args[0] if isinstance(exn, ShardFailed) else exn
        log.warning("skipped the rest of shard %s: %s", url, why)
        return True  # go on with the next shard

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            # (worker, workers, pass, number), from PositionStage if the pipeline has one
            position = sample.get("__position__")
            rng = None
            if position is not None and self.order is not None:
                # the crop and flip draw from the sample's place in the data, not from a
                # generator that every earlier sample moved on: the same after a resume
                o = self.order
                seed = derive_seed("augment", o.seed, o.start_step, o.rank, *position)
                rng = random.Random(seed)
            try:
                example = self.transform(sample, rng)
            except SkipSample as why:
                self.pending[why.kind] += 1
                self.pending_shards[str(sample.get("__url__"))] += 1
                log.warning(
                    "skipped %s in %s (%s): %s",
                    sample.get("__key__"),
                    sample.get("__url__"),
                    why.kind,
                    why,
                )
                continue
            example["key"] = sample["__key__"]  # which sample it was: data-order tests, debugging
            if position is not None:
                example["position"] = position
            example["skipped"], self.pending = dict(self.pending), Counter()
            example["skipped_shards"], self.pending_shards = dict(self.pending_shards), Counter()
            yield example
