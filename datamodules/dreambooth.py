"""DreamBooth data (`data=dreambooth`): every batch holds a fixed number of the subject's images
(the instance set) and of class images the base model drew (`sdtrain.artifacts.class_images`).

    data:
      batch_size: 2
      dreambooth:
        instance_shards: /data/my_dog/        # captioned "a photo of sks dog", say
        class_per_batch: 1                    # the rest of each batch is the instance set's
        class_images: {prompt: "a photo of a dog", num_images: 200}

The two sets are the two sources of a mixture (`datamodules.mixture`) named `INSTANCE` and
`CLASS`, so each sample carries its source's name (`batch.SOURCES`: the flag the prior-preservation
loss reads, `sdtrain.training.prior`) and the run logs data/drawn/instance and data/drawn/class.
Instead of drawing sources at random by weight, the mixture takes them in a fixed turn (k instance
samples, then m class samples, ...) and `PerSourceBatcher` puts exactly k and m in each batch,
whatever a skipped sample does to the turn. Each source streams its shards endlessly
(`data.resampled=true`; false is refused), and batches are square crops (`data.buckets` is
refused: two sources' images of other shapes could not share a batch of one shape).

`class_per_batch: 0` trains on the instance set alone (DreamBooth without prior preservation).
`class_shards` names the class images: sdtrain-train fills it in before it builds the data, with
the set `class_images` describes, drawn by the base model or found again in `cache_dir`
(`sdtrain.artifacts.class_images.fill_class_shards`); set, it names class images made elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from sdtrain.datamodules.mixture import MixedSamples, Mixture, tar_samples
from sdtrain.datamodules.webdataset import WebDataModule

INSTANCE = "instance"
CLASS = "class"
KEYS = (
    "instance_shards", "instance_caption_template", "class_per_batch", "class_shards",
    "class_images", "cache_dir", "pretrained", "single_file_config",
)  # fmt: skip
MAX_WAITING = 1000  # batches' worth of one source's samples held while the other gives none


class TurnMixture(Mixture):
    """A mixture whose sources are drawn in a fixed turn: `counts[i]` samples of source i, then
    of source i + 1, ... (`TurnSamples`), instead of at random by weight."""

    def __init__(self, sources, read_cache, counts: list[int]) -> None:
        super().__init__(sources, read_cache)
        self.turn = [i for i, n in enumerate(counts) for _ in range(n)]

    def samples(
        self, order, cursor, transform, shard_error, shuffle_buffer: int, shared: bool,
        read=None,
    ) -> TurnSamples:  # fmt: skip
        mixed = TurnSamples(
            self.sources, order, cursor, transform.pending, shard_error, shuffle_buffer, shared,
            read or tar_samples,
        )  # fmt: skip
        mixed.turn = self.turn
        return mixed


class TurnSamples(MixedSamples):
    """`MixedSamples` picking its sources in `turn` order, over and over."""

    turn: list[int]

    def __iter__(self) -> Iterator[dict]:
        self._at = 0
        return super().__iter__()

    def pick(self, rng, alive: set[int]) -> int:
        while True:
            i = self.turn[self._at % len(self.turn)]
            self._at += 1
            if i in alive:
                return i


class PerSourceBatcher:
    """Pipeline stage: examples -> batches of exactly `counts[name]` examples of each source, in
    the order `counts` lists the sources, collated by `collate` (`mixture.MixtureCollate`)."""

    def __init__(self, counts: dict[str, int], collate) -> None:
        self.counts = {name: n for name, n in counts.items() if n > 0}
        self.collate = collate

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        waiting: dict[str, list[dict]] = {name: [] for name in self.counts}
        for example in src:
            name = example["source"]
            waiting[name].append(example)
            if all(len(waiting[n]) >= k for n, k in self.counts.items()):
                batch = []
                for n, k in self.counts.items():
                    batch += waiting[n][:k]
                    del waiting[n][:k]
                yield self.collate(batch)
            elif len(waiting[name]) > MAX_WAITING * self.counts[name]:
                short = [n for n, k in self.counts.items() if len(waiting[n]) < k]
                raise RuntimeError(
                    f"data.dreambooth: {len(waiting[name])} samples of {name} wait for one of "
                    f"{', '.join(short)}, which gives no usable sample: check its shards"
                )


def parse(dreambooth: Any, batch_size: int) -> dict[str, Any]:
    """`data.dreambooth` checked: unknown keys, shards, a class share that leaves room for the
    instance set; ValueError naming key and value."""
    if not isinstance(dreambooth, Mapping):
        raise ValueError(
            f"data.dreambooth={dreambooth!r} must be a map (conf/data/dreambooth.yaml)"
        )
    d = dict(dreambooth)
    unknown = sorted(set(d) - set(KEYS))
    if unknown:
        raise ValueError(
            f"data.dreambooth has unknown key(s) {unknown}; it takes {', '.join(KEYS)}"
        )
    if not d.get("instance_shards"):
        raise ValueError(
            f"data.dreambooth.instance_shards={d.get('instance_shards')!r}: name the subject's "
            "shards (sdtrain-shards of its folder)"
        )
    m = d.get("class_per_batch", 1)
    if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m < batch_size:
        raise ValueError(
            f"data.dreambooth.class_per_batch={m!r} must be a whole number in [0, "
            f"data.batch_size={batch_size}): each batch holds at least one instance sample"
        )
    d["class_per_batch"] = m
    return d


class DreamBoothDataModule(WebDataModule):
    """`WebDataModule` over the instance and class sets (see the module docs).

    Args:
        dreambooth: {instance_shards, instance_caption_template, class_per_batch, class_shards,
            class_images: `ClassImages`' fields, cache_dir, pretrained, single_file_config}.
        **kwargs: `WebDataModule`'s arguments; `train_shards` and `sources` stay None (the two
            sets are the sources), `resampled` true and `buckets` None.
    """

    def __init__(self, dreambooth: dict[str, Any], **kwargs: Any) -> None:
        for key in ("train_shards", "sources", "buckets"):
            if kwargs.pop(key, None) is not None:
                raise ValueError(
                    f"data.{key} is set with data.dreambooth: the instance and class "
                    f"sets are the shards (data=dreambooth sets data.{key}=null)"
                )
        if kwargs.get("resampled") is False:
            raise ValueError(
                "data.resampled=false with data.dreambooth: its sets stream endlessly in a fixed "
                "turn (data.resampled=true)"
            )
        d = parse(dreambooth, kwargs.get("batch_size", 16))
        m = d["class_per_batch"]
        self.per_batch = {INSTANCE: kwargs.get("batch_size", 16) - m, CLASS: m}
        sources = [
            {"name": INSTANCE, "shards": d["instance_shards"], "weight": self.per_batch[INSTANCE],
             "caption_template": d.get("instance_caption_template")},
        ]  # fmt: skip
        if m and not d.get("class_shards"):
            raise ValueError(
                "data.dreambooth.class_shards=null: sdtrain-train draws the class images "
                "(data.dreambooth.class_images, sdtrain.artifacts.class_images) before it builds "
                "the data; a datamodule built otherwise names them in class_shards"
            )
        if m:
            sources.append({"name": CLASS, "shards": d["class_shards"], "weight": m})
        self.mixture_class = lambda parsed, read: TurnMixture(
            parsed, read, [s["weight"] for s in sources]
        )
        super().__init__(train_shards=None, sources=sources, **kwargs)

    def batcher(self, collate) -> PerSourceBatcher:
        return PerSourceBatcher(self.per_batch, collate)
