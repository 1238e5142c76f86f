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

Here: the `Mixture` the datamodule asks; beside it `mixture_spec` (parsing `data.sources`),
`mixture_draw` (the weighted draw) and `mixture_counts` (per-source counters), whose names stay
importable from here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from sdtrain.datamodules.captions import CaptionProcessor, caption_processor
from sdtrain.datamodules.mixture_counts import (  # noqa: F401  (re-exported: this module's API)
    MixtureCollate,
    MixtureTransform,
    SourceShardError,
)
from sdtrain.datamodules.mixture_draw import MixedSamples, tar_samples
from sdtrain.datamodules.mixture_spec import (  # noqa: F401  (re-exported: this module's API)
    KEYS,
    NAME,
    SOURCE,
    Source,
    parse_source,
    parse_sources,
    relabel,
)
from sdtrain.datamodules.order import Cursor, DataOrder
from sdtrain.datamodules.sources import check_shard_kind, read_latent_cache
from sdtrain.datamodules.survey import Survey, survey_shards

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
