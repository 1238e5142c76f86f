"""Weighted mixtures of shard sets (`data.sources`): every sample of the training stream is drawn
from one source, picked by weight.

    sources:
      - {name: laion, shards: "/data/laion/{00000..09999}.tar", weight: 0.8}
      - {name: mine, shards: /data/mine/, weight: 0.2, caption_template: "a photo of {caption}"}

`data.sources` replaces `data.train_shards` (setting both is refused). Each source names its
shards in any form `data.train_shards` takes; a source may be a latent cache folder (every source
then must be one, made by the same VAE, text encoder and settings: a batch stacks one kind of
tensor). Its optional `caption_template` replaces `data.caption_template` for its captions.
Weights are relative (0.8 and 0.2, or 4 and 1): each draw picks source i with probability
weight_i / sum(weights), so over n draws source i gives n x its share, within the binomial
spread sqrt(n x share x (1 - share)).

The draws are seeded by (data.seed, the step the run started from, rank, DataLoader worker,
pass): the same settings draw the same samples. Each source is read as a single source is
(`datamodules.order`): its own shard order and shuffle buffer (`data.shuffle_buffer` samples per
source: memory grows with the source count), seeded apart from the other sources. Every sample
carries its source's name; a batch says where each sample came from (`batch.SOURCES`) and how
many unusable samples each source gave (`batch.SKIPPED_SOURCES`), which the `SourceCounts`
callback sums over ranks and logs as `data/drawn/<name>` and `data/skipped/<name>`.

When a source runs out:
- `data.resampled=true` (the default): it never does. Each source streams its shards endlessly
  in each DataLoader worker (every shard once a round), and the mixture draws from these
  streams. A resume draws anew from the step it resumes at, as a single source does.
- `data.resampled=false` (passes): a pass of the mixture ends when every source has been read to
  its end at least once, so the last source to run out ends it. A source that runs out before
  that starts over at once, in a new shard order and shuffle, and the mixture goes on drawing
  from it by its weight: the draws never leave the weights, and a small source weighted high
  comes round several times a pass (each round gives every one of its samples once). When the
  pass ends, the round such a source was in is cut off there; the next pass starts every
  source afresh. As for one source, each pass's stream is the same in every rank and worker,
  formed into batches once (by bucket, with `data.buckets`) and dealt out whole
  (`datamodules.passes`), so a checkpoint holds the pass and the place in it, and a resumed run
  trains on exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.captions import CaptionProcessor, caption_processor
from sdtrain.datamodules.order import (
    Cursor,
    DataOrder,
    ResampledShardList,
    ShuffledShardList,
    ShuffleStage,
)
from sdtrain.datamodules.sources import check_shard_kind, expand_shards, read_latent_cache
from sdtrain.datamodules.survey import Survey, survey_shards
from sdtrain.datamodules.transforms import SkipSample
from sdtrain.runtime.seeds import derive_seed

SOURCE = "__source__"  # a raw sample's source name, set where the mixture draws it
KEYS = ("name", "shards", "weight", "caption_template")
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a metric key's part: data/drawn/<name>
# cache.json settings every latent-cache source must share: batches stack their tensors, and the
# module checks the first cache against its VAE and text encoder for all of them
CACHE_KEYS = (
    "vae_fingerprint",
    "text_encoder_fingerprint",
    "resolution",
    "latent_shape",
    "context_shape",
    "pooled_shape",
    "files",
)


@dataclass(frozen=True)
class Source:
    """One entry of `data.sources`: its place in the list, name, shards (expanded) and weight."""

    index: int
    name: str
    urls: tuple[str, ...]
    weight: float
    caption_template: str | None = None

    @property
    def where(self) -> str:
        """How messages name it: "data.sources[1] (mine)"."""
        return f"data.sources[{self.index}] ({self.name})"

    @property
    def shards_key(self) -> str:
        """How messages name its shards: "data.sources[1].shards (mine)"."""
        return f"data.sources[{self.index}].shards ({self.name})"


def relabel(error: Exception, where: str) -> Exception:
    """`error` of the same type with "data.train_shards" in its message replaced by `where`."""
    return type(error)(str(error).replace("data.train_shards", where))


def parse_source(index: int, entry: Any, expand: Callable[[Any], list[str]]) -> Source:
    """One `data.sources` entry, checked: a map of a name, shards, a weight > 0 and an optional
    caption template, its shards listed by `expand` (`sources.expand_shards`). ValueError
    (FileNotFoundError for missing shards) naming key and value."""
    at = f"data.sources[{index}]"
    if not isinstance(entry, Mapping):  # a dict, or an OmegaConf DictConfig
        raise ValueError(f"{at}={entry!r} must be a map of name, shards, weight")
    entry = dict(entry)
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise ValueError(f"{at} has unknown key(s) {unknown}: an entry takes {', '.join(KEYS)}")
    name = entry.get("name")
    if name is None or name == "":
        raise ValueError(
            f"{at}.name is missing: each source needs a name (its counters are "
            "data/drawn/<name> and data/skipped/<name>)"
        )
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{at}.name={name!r} must be letters, digits, '_', '.' or '-'")
    if name in B.SKIP_KINDS:
        raise ValueError(
            f"{at}.name={name!r} is a skip kind (data/skipped/{name} counts those): name the "
            "source otherwise"
        )
    weight = entry.get("weight")
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not number or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{at}.weight={weight!r} ({name}) must be a number > 0")
    shards = entry.get("shards")
    if isinstance(shards, Sequence) and not isinstance(shards, str):
        shards = list(shards)
    if shards is None or shards == "" or shards == []:
        raise ValueError(f"{at}.shards={shards!r} ({name}) names no shards")
    where = f"{at}.shards ({name})"
    try:
        urls = expand(shards)
    except (ValueError, FileNotFoundError) as e:  # its message names data.train_shards
        raise relabel(e, where) from None
    template = entry.get("caption_template")
    return Source(index, name, tuple(urls), float(weight), template)


def parse_sources(
    sources: Sequence[dict] | None,
    train_shards: Any,
    expand: Callable[[Any], list[str]] = expand_shards,
) -> list[Source] | None:
    """`data.sources` checked, each source's shards listed by `expand` (`sources.expand_shards`
    with the datamodule's settings), or None when it is not set (`data.train_shards` names the
    shards).

    Raises:
        ValueError: both or neither of `data.train_shards` and `data.sources` are set, the list
            is empty, or an entry is bad (`parse_source`), or two entries share a name.
        FileNotFoundError: a source's local shards do not exist.
    """
    if sources is None:
        if train_shards is None:
            raise ValueError(
                "data.train_shards=null and data.sources=null: name the shards to train on in "
                "one of them"
            )
        return None
    if train_shards is not None:
        raise ValueError(
            f"data.train_shards={train_shards!r} and data.sources are both set: a mixture "
            "names its shards in data.sources, each entry's shards (set data.train_shards=null, "
            "as data=mixture does)"
        )
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or not sources:
        raise ValueError(
            f"data.sources={sources!r} must be a non-empty list of {{name, shards, weight}} "
            "entries (conf/data/mixture.yaml)"
        )
    parsed: list[Source] = []
    for index, entry in enumerate(sources):
        source = parse_source(index, entry, expand)
        same = [s for s in parsed if s.name == source.name]
        if same:
            raise ValueError(
                f"data.sources[{index}].name={source.name!r} is also data.sources"
                f"[{same[0].index}]'s: each source needs a name of its own"
            )
        parsed.append(source)
    return parsed


class Mixture:
    """The sources of a mixture, and what the datamodule asks of them: every shard, the latent
    cache they are (if any), a survey of a small set, the transform and the pipeline's source."""

    def __init__(
        self,
        sources: list[Source],
        read_cache: Callable[[list[str]], dict | None] = read_latent_cache,
    ) -> None:
        self.sources = sources
        self.names = [s.name for s in sources]
        self.infos = [self._read_cache(s, read_cache) for s in sources]  # cache.json or None

    @property
    def urls(self) -> list[str]:
        """Every source's shards, each once, in the order the sources list them."""
        return list(dict.fromkeys(u for s in self.sources for u in s.urls))

    @staticmethod
    def _read_cache(source: Source, read_cache: Callable) -> dict | None:
        try:
            return read_cache(list(source.urls))
        except ValueError as e:
            raise relabel(e, source.shards_key) from None

    def latent_cache_info(self) -> dict | None:
        """The first source's cache.json when every source is a latent cache made alike (the
        module checks it against its VAE for all), None when all are image shards.

        Raises:
            ValueError: image shards mixed with a latent cache, or caches made differently.
        """
        first, info = self.sources[0], self.infos[0]
        for source, other in zip(self.sources[1:], self.infos[1:], strict=True):
            if (info is None) != (other is None):
                kinds = [f"{s.where}: {'latent cache' if i else 'image shards'}"
                         for s, i in ((first, info), (source, other))]  # fmt: skip
                raise ValueError(
                    f"data.sources mixes image shards and latent caches ({'; '.join(kinds)}): "
                    "a batch holds pixels or latents, not both. Cache the image sources too "
                    "(sdtrain-cache-latents), or train on the image shards of all of them."
                )
            if info is None:
                continue
            differ = [k for k in CACHE_KEYS if info.get(k) != other.get(k)]
            if differ:
                raise ValueError(
                    f"data.sources: the latent caches of {first.where} ({info['folder']}) and "
                    f"{source.where} ({other['folder']}) differ in {', '.join(differ)} "
                    f"(cache.json): cache both with the same --pretrained, --resolution and --text"
                )
        return info

    def check_kind(self, h: Any, buckets: list | None) -> None:
        """`sources.check_shard_kind` for each source, its messages naming the source."""
        for source, info in zip(self.sources, self.infos, strict=True):
            try:
                check_shard_kind(h, info, list(source.urls), buckets)
            except ValueError as e:
                raise relabel(e, source.shards_key) from None

    def survey(self, bucketed: bool, max_pixels: int | None) -> Survey | None:
        """Every source's `survey_shards` in one (None if any is remote or large); a source
        without a usable sample is refused, naming it."""
        found = []
        for source in self.sources:
            try:
                one = survey_shards(list(source.urls), bucketed, max_pixels)
            except ValueError as e:
                raise relabel(e, source.shards_key) from None
            if one is None:
                return None
            found.append(one)
        return Survey(
            tuple(u for f in found for u in f.urls),
            sum(f.samples for f in found),
            tuple(size for f in found for size in f.sizes),
        )

    def captions(
        self, template: str | None, shuffle_tags: bool, keep_tags: int, tag_separator: str
    ) -> dict[str, CaptionProcessor | None]:
        """Each source's caption rewriting: its own template, else `data.caption_template`."""
        out = {}
        for s in self.sources:
            try:
                out[s.name] = caption_processor(
                    s.caption_template or template, shuffle_tags, keep_tags, tag_separator
                )
            except ValueError as e:  # its message names data.caption_template
                where = f"data.sources[{s.index}].caption_template"
                raise ValueError(str(e).replace("data.caption_template", where)) from None
        return out

    def transform(self, make: Callable[[CaptionProcessor | None, dict | None], Any], captions):
        """A `MixtureTransform` of `make(captions, cache info)` for each source; what `make`
        refuses (a template for a cache of text contexts) names the source."""
        transforms = {}
        for s, info in zip(self.sources, self.infos, strict=True):
            try:
                transforms[s.name] = make(captions[s.name], info)
            except ValueError as e:
                raise ValueError(f"{s.where}: {e}") from None
        return MixtureTransform(transforms)

    def layout(self) -> list[list]:
        """What a data position means only under (`WebDataModule.layout`): each source's name,
        weight, shards (a hash and the count) and caption template."""
        return [
            [s.name, s.weight, hashlib.sha256("\n".join(s.urls).encode()).hexdigest()[:16],
             len(s.urls), s.caption_template]
            for s in self.sources
        ]  # fmt: skip

    def samples(
        self, order: DataOrder, cursor: Cursor, transform: MixtureTransform, shard_error,
        shuffle_buffer: int, shared: bool, read: Callable | None = None,
    ) -> MixedSamples:  # fmt: skip
        """The pipeline's source of raw samples (`MixedSamples`); `read(handler)` makes the
        stage that reads tar shards (default `tar_samples`)."""
        return MixedSamples(
            self.sources, order, cursor, transform.pending, shard_error, shuffle_buffer, shared,
            read or tar_samples,
        )  # fmt: skip


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


def tar_samples(handler: Callable[[Exception], bool]):
    """The stage that reads shards' urls into raw samples: webdataset's tar reader, on `handler`
    for a shard that fails."""
    return wds.tarfile_to_samples(handler=handler)


class SourceShardError:
    """The tar reader's handler for one source: count a bad shard as the source's (`pending`),
    then let `handler` (`DecodeStage.shard_error`) count and log it and go on."""

    def __init__(self, name: str, pending: Counter, handler: Callable[[Exception], bool]) -> None:
        self.name, self.pending, self.handler = name, pending, handler

    def __call__(self, exn: Exception) -> bool:
        self.pending[self.name] += 1
        return self.handler(exn)


class MixedSamples(IterableDataset):
    """Pipeline source: raw samples drawn from the sources by weight, each tagged with its source
    (`SOURCE`); see the module docs for what happens when a source runs out.

    `shared=False` (data.resampled=true): every source an endless stream of this worker's
    (`ResampledShardList`), drawn in an order seeded by rank and worker too. `shared=True`
    (data.resampled=false): one pass (`cursor.passes`) of the mixture, the same in every rank and
    worker (`datamodules.passes` forms and deals its batches).
    """

    def __init__(
        self, sources: list[Source], order: DataOrder, cursor: Cursor, pending: Counter,
        shard_error: Callable[[Exception], bool], shuffle_buffer: int, shared: bool,
        read: Callable = tar_samples,
    ) -> None:  # fmt: skip
        super().__init__()
        self.sources, self.order, self.cursor = list(sources), order, cursor
        self.pending, self.shard_error, self.read = pending, shard_error, read
        self.shuffle_buffer, self.shared = shuffle_buffer, shared
        self.bounds = list(accumulate(s.weight for s in sources))  # cumulative weights

    def stream(self, source: Source, round_: int) -> Iterator[dict]:
        """One source's raw samples: a round of its shards (an endless one unless `shared`),
        read and shuffled as a single source's are, on a seed of its own."""
        seed = derive_seed("source", self.order.seed, source.name, round_)
        order = replace(self.order, seed=seed)
        shards = ShuffledShardList if self.shared else ResampledShardList
        handler = SourceShardError(source.name, self.pending, self.shard_error)
        pipe = wds.DataPipeline(
            shards(list(source.urls), order, self.cursor),
            self.read(handler),
            ShuffleStage(self.shuffle_buffer, order, self.cursor, shared=self.shared),
        )
        for sample in pipe:
            sample[SOURCE] = source.name
            yield sample

    def pick(self, rng, alive: set[int]) -> int:
        """A source index drawn by weight among `alive` (drawn again while a dead one comes)."""
        while True:
            i = bisect.bisect_right(self.bounds, rng.random() * self.bounds[-1])
            i = min(i, len(self.bounds) - 1)  # random() * total can round up to the total
            if i in alive:
                return i

    def __iter__(self) -> Iterator[dict]:
        c = self.cursor
        rng = self.order.rng("mix", c.passes, None if self.shared else c.worker)
        n = len(self.sources)
        streams: list[Iterator[dict] | None] = [None] * n  # started when first drawn
        rounds, ran_out, alive = [0] * n, set(), set(range(n))
        while alive:
            i = self.pick(rng, alive)
            if streams[i] is None:
                streams[i] = self.stream(self.sources[i], rounds[i])
            sample = next(streams[i], None)
            if sample is None:  # only a shared pass's rounds end
                ran_out.add(i)
                if ran_out >= alive:
                    return  # every source read to its end: the pass is over
                rounds[i] += 1
                streams[i] = self.stream(self.sources[i], rounds[i])
                sample = next(streams[i], None)
                if sample is None:  # a round gives nothing: its shards hold no sample
                    alive.discard(i)
                    if ran_out >= alive:
                        return
                    continue
            yield sample
