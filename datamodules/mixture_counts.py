"""A mixture's per-source counters: each example's source, the unusable samples of each source."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.mixture_spec import SOURCE
from sdtrain.datamodules.transforms import SkipSample


class MixtureTransform:
    """Raw sample -> example by its source's transform (`SOURCE` names it), the example tagged
    with the source ("source") and the unusable samples each source gave since the example
    before ("skipped_sources", as `DecodeStage` attaches "skipped"). A bad shard of a source is
    counted into `pending` where it is read (`SourceShardError`)."""

    def __init__(self, transforms: dict[str, Any]) -> None:
        self.transforms = transforms
        self.pending: Counter[str] = Counter()  # source -> unusable samples not yet reported

    def precheck(self, sample: dict) -> tuple | None:
        """The source's transform's `precheck`: the sample's bucket or None, or SkipSample."""
        return self.transforms[sample[SOURCE]].precheck(sample)

    def __call__(self, sample: dict, rng=None) -> dict:
        name = sample[SOURCE]
        try:
            example = self.transforms[name](sample, rng)
        except SkipSample:
            self.pending[name] += 1
            raise
        example["source"] = name
        example["skipped_sources"], self.pending = dict(self.pending), Counter()
        return example


class MixtureCollate:
    """Examples -> a batch by `collate` (`transforms.Collate`), with each sample's source
    (`batch.SOURCES`) and the unusable samples of each of `names` (`batch.SKIPPED_SOURCES`)."""

    def __init__(self, collate: Callable[[list[dict]], dict], names: list[str]) -> None:
        self.collate, self.names = collate, list(names)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        batch[B.SOURCES] = [e["source"] for e in examples]
        skipped: Counter[str] = Counter()
        for e in examples:
            skipped.update(e.get("skipped_sources") or {})
        batch[B.SKIPPED_SOURCES] = {name: skipped[name] for name in self.names}
        return batch


class SourceShardError:
    """The tar reader's handler for one source: count a bad shard as the source's (`pending`),
    then let `handler` (`DecodeStage.shard_error`) count and log it and go on."""

    def __init__(self, name: str, pending: Counter, handler: Callable[[Exception], bool]) -> None:
        self.name, self.pending, self.handler = name, pending, handler

    def __call__(self, exn: Exception) -> bool:
        self.pending[self.name] += 1
        return self.handler(exn)
