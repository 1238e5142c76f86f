"""A multirun's table: one row per run, its overrides and the metric `train()` returned.

A Hydra callback (`hydra.callbacks.sweep_table` in conf/train.yaml). Hydra 1.3's own
`LogJobReturnCallback` logs each job's return value as it ends, into that job's log; this gathers
them and prints one table when the multirun ends, e.g.

    multirun outputs/train/multiruns/2026-11-27_03-30-00: 2 runs, train/loss as train() returned it
      every run: trainer.max_steps=1000
      #  train/loss  overrides
      0      0.1234  model.optimizer.lr=1e-4
      1      0.2345  model.optimizer.lr=3e-4

The table goes to stdout (the job logs belong to the jobs) and to `runs.txt` in the sweep folder.
The rows are gathered in `on_job_end`, which runs in this process with Hydra's basic launcher (the
default); a launcher that runs jobs elsewhere leaves the table empty.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class SweepTable(Callback):
    """Prints a table of a multirun's runs (overrides, metric returned) when it ends."""

    def __init__(self, filename: str | None = "runs.txt") -> None:
        self.filename = filename
        self.rows: list[tuple[str, str, list[str]]] = []  # (job number, metric/status, overrides)
        self.metric = "metric"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.rows = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.metric = str(config.get("optimized_metric") or self.metric)
        num = str(OmegaConf.select(config, "hydra.job.num", default=len(self.rows)))
        if job_return.status == JobStatus.COMPLETED:
            value = job_return._return_value
            shown = "-" if value is None else f"{value:.6g}" if isinstance(value, float) else value
        else:
            shown = f"failed: {type(job_return._return_value).__name__}"
        self.rows.append((num, str(shown), list(job_return.overrides or [])))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.rows:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        text = table(self.rows, self.metric, sweep_dir)
        print(text, flush=True)
        if self.filename and sweep_dir.is_dir():
            (sweep_dir / self.filename).write_text(text + "\n")


def table(rows: list[tuple[str, str, list[str]]], metric: str, sweep_dir: Path) -> str:
    """The rows under a header line, columns aligned (metric right-aligned); overrides that
    every run shares are named once, above the table."""
    shared = [o for o in rows[0][2] if all(o in r[2] for r in rows)] if len(rows) > 1 else []
    cells = [(n, v, " ".join(o for o in ov if o not in shared)) for n, v, ov in rows]
    header = ("#", metric, "overrides")
    w0 = max(len(r[0]) for r in [*cells, header])
    w1 = max(len(r[1]) for r in [*cells, header])
    lines = [f"multirun {sweep_dir}: {len(rows)} runs, {metric} as train() returned it"]
    if shared:
        lines.append(f"  every run: {' '.join(shared)}")
    lines += [f"  {a:>{w0}}  {b:>{w1}}  {c}" for a, b, c in [header, *cells]]
    return "\n".join(lines)
