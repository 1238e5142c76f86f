"""Unusable data samples: counted by kind and by shard, summed over ranks, and a limit on their
share that stops a run training on mostly broken data.

The data pipeline skips each unusable sample (sdtrain.datamodules.batch.SKIP_KINDS) and each batch says how
many it skipped while it was made, by kind and by shard. `SkipTally` adds them up: the totals
(and the samples drawn, usable or not) are summed over ranks, so every rank holds the run's
numbers and the checkpoint written by rank 0 restores them on all; the per-shard counts stay on
the rank that read the shards and name the worst of them when the limit is passed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from sdtrain.datamodules import batch as B
from sdtrain.runtime import devices

log = logging.getLogger(__name__)

CHECK_EVERY = 20  # batches between checks of the limit (each check is one host sync)


class BadDataError(RuntimeError):
    """Too large a share of the samples drawn was unusable."""


class SkipTally:
    """Skipped and drawn samples of a run (see module docs).

    Args:
        max_fraction: stop once more than this share of the samples drawn so far was unusable;
            None: never stop.
        min_samples: samples drawn before the limit applies (a few bad samples at the start are
            no verdict on the data).
    """

    def __init__(self, max_fraction: float | None = 0.5, min_samples: int = 200) -> None:
        if max_fraction is not None and not 0.0 < max_fraction <= 1.0:
            raise ValueError(
                f"model.max_bad_data_fraction={max_fraction} must be in (0, 1], or null for no limit"
            )
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.total = torch.zeros((), dtype=torch.int64)  # skipped, all ranks
        self.by_kind = torch.zeros(len(B.SKIP_KINDS), dtype=torch.int64)  # by B.SKIP_KINDS
        self.drawn = torch.zeros((), dtype=torch.int64)  # skipped + trained on, all ranks
        self.by_shard: Counter[str] = Counter()  # skipped per shard url, this rank's
        self._batches = 0

    def add(self, batch: dict[str, Any], device: torch.device, reduce: Callable | None) -> None:
        """Count one batch's skips (summed over ranks with `reduce`, if given): no host sync
        except every CHECK_EVERY batches, when the limit is checked on every rank alike."""
        n = int(batch.get(B.SKIPPED, 0))
        kinds = batch.get(B.SKIPPED_KINDS) or {}
        counts = [n] + [kinds.get(k, 0) for k in B.SKIP_KINDS] + [n + B.batch_size(batch)]
        # int64: exact past 2**24; no host sync on a GPU (it would stall every step)
        counts = devices.to_device(torch.tensor(counts, dtype=torch.int64), device)
        if reduce is not None:
            counts = reduce(counts)
        self.total = self.total.to(device) + counts[0]
        self.by_kind = self.by_kind.to(device) + counts[1:-1]
        self.drawn = self.drawn.to(device) + counts[-1]
        self.by_shard.update(batch.get(B.SKIPPED_SHARDS) or {})
        self._batches += 1
        if self.max_fraction is not None and self._batches % CHECK_EVERY == 0:
            self.check()

    def kinds(self) -> dict[str, int]:
        """{kind: count} of the non-zero kinds."""
        return {k: int(n) for k, n in zip(B.SKIP_KINDS, self.by_kind.tolist(), strict=True) if n}

    def check(self) -> None:
        """Raise BadDataError naming the kinds and this rank's worst shards past the limit."""
        bad, drawn = int(self.total), int(self.drawn)
        if (
            self.max_fraction is None
            or drawn < self.min_samples
            or bad <= self.max_fraction * drawn
        ):
            return
        kinds = ", ".join(f"{k} {n}" for k, n in self.kinds().items())
        worst = self.worst_shards() or "none here"
        raise BadDataError(
            f"{int(bad)} of {int(drawn)} data samples drawn so far ({bad / drawn:.0%}) were "
            f"unusable, more than model.max_bad_data_fraction={self.max_fraction} ({kinds}); "
            f"the shards with the most on this rank: {worst}. Fix or remove them, or raise "
            "the limit (null: none)"
        )

    def worst_shards(self, n: int = 5) -> str:
        """The `n` shards with the most skipped samples on this rank: "url (count), ..."."""
        return ", ".join(f"{url} ({k})" for url, k in self.by_shard.most_common(n))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (`sdtrain.artifacts.checkpoint.build`)."""
        by_kind = dict(zip(B.SKIP_KINDS, map(int, self.by_kind.tolist()), strict=True))
        return {"total": int(self.total.item()), "by_kind": by_kind, "drawn": int(self.drawn)}

    def load(self, total: int, by_kind: dict[str, int], drawn: int) -> None:
        self.total = torch.tensor(int(total))
        self.by_kind = torch.tensor([int(by_kind.get(k, 0)) for k in B.SKIP_KINDS])
        self.drawn = torch.tensor(int(drawn))
