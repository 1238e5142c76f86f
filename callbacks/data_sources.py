"""Per-source counters of a weighted mixture (`data.sources`, `sdtrain.datamodules.mixture`):
`data/drawn/<name>`, the samples drawn from each source so far (usable or not: the weights apply
to these), and `data/skipped/<name>`, the unusable ones among them, beside the run's
`data/skipped/<kind>` that the module logs. Both are summed over ranks and kept in checkpoints,
so a resumed run counts on. A run of one shard set (`data.train_shards`) logs none of them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from sdtrain.datamodules import batch as B
from sdtrain.runtime import devices


class SourceCounts(Callback):
    """Sums each mixture batch's source record (`batch.SOURCES`, `batch.SKIPPED_SOURCES`) over
    ranks and logs the running totals at every batch (see module docs)."""

    def __init__(self) -> None:
        self.names: list[str] = []  # the sources, in data.sources order
        self.totals: torch.Tensor | None = None  # (2, sources) int64: drawn, skipped
        self.restored: dict[str, list[int]] = {}  # a checkpoint's {name: [drawn, skipped]}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict) or B.SOURCES not in batch:
            return
        skipped = batch[B.SKIPPED_SOURCES]  # every source, in order: the same on every rank
        if self.totals is None or list(skipped) != self.names:
            self.start(list(skipped))
        picked = Counter(batch[B.SOURCES])
        counts = [[picked[n] + skipped[n] for n in self.names], [skipped[n] for n in self.names]]
        # int64: exact past 2**24; moved without a host sync (a GPU would stall every step)
        counts = devices.to_device(torch.tensor(counts, dtype=torch.int64), pl_module.device)
        if trainer.world_size > 1:  # every rank reaches each batch's end: the collectives line up
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self.totals = self.totals.to(counts.device) + counts
        values = self.totals.float()
        for i, name in enumerate(self.names):
            pl_module.log(f"data/drawn/{name}", values[0, i])
            pl_module.log(f"data/skipped/{name}", values[1, i])

    def start(self, names: list[str]) -> None:
        """Count `names` from the checkpoint's totals (a source new to the run from 0)."""
        self.names = names
        rows = [self.restored.get(n, [0, 0]) for n in names]
        self.totals = torch.tensor([[r[0] for r in rows], [r[1] for r in rows]], dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        if self.totals is None:
            return dict(self.restored)  # nothing drawn since a resume: keep what it restored
        drawn, skipped = self.totals.cpu().tolist()
        return self.restored | {
            n: [d, s] for n, d, s in zip(self.names, drawn, skipped, strict=True)
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = {str(n): [int(v) for v in row] for n, row in state_dict.items()}
        self.totals = None  # started again from these at the next batch
