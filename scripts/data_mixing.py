"""How well sdtrain's loader mixes shards: each caption's share of the batches, step by step.

    python scripts/data_mixing.py "/data/glyphs/{00000..00008}.tar" --model tiny-sd \
        --workers 8 --batch-size 128 --steps 400

Reads batches from the real datamodule (data=webdataset's loader, no model) and treats each
distinct caption as a class. Prints, against what uniform random batches would give: the spread
of a class's share from step to step, its spread over windows of 50 steps, the lowest and highest
share any class has over such a window, and how many classes each of the first 5 batches holds.
Shards written class by class (a folder sorted by class) show whether the loader mixes them
(docs/parity.md, the glyphs task).
"""

from __future__ import annotations

import argparse
from collections import Counter
from itertools import islice

import numpy as np

from sdtrain.datamodules.webdataset import WebDataModule

WINDOW = 50  # steps


def class_counts(dm: WebDataModule, steps: int) -> np.ndarray:
    """(steps, classes) caption counts of the first `steps` batches."""
    dm.setup("fit")
    names: dict[str, int] = {}
    rows = []
    for batch in islice(dm.train_dataloader(), steps):
        counts = Counter(batch["captions"])
        for caption in counts:
            names.setdefault(caption, len(names))
        row = np.zeros(len(names))
        for caption, n in counts.items():
            row[names[caption]] = n
        rows.append(row)
    out = np.zeros((len(rows), len(names)))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def mixing(counts: np.ndarray) -> dict[str, float]:
    """Share spreads of `counts` (steps, classes) and what uniform batches would give."""
    batch, k = counts[0].sum(), counts.shape[1]
    share = counts / counts.sum(1, keepdims=True)
    windows = np.array([counts[i : i + WINDOW].sum(0) for i in range(0, len(counts) - WINDOW, 10)])
    windows = windows / windows.sum(1, keepdims=True)
    p = 1 / k
    return {
        "classes": k,
        "step_sd": float(share.std(0).mean()),
        "step_sd_uniform": float(np.sqrt(p * (1 - p) / batch)),
        "window_sd": float(windows.std(0).mean()),
        "window_sd_uniform": float(np.sqrt(p * (1 - p) / (WINDOW * batch))),
        "window_min": float(windows.min()),
        "window_max": float(windows.max()),
        "first_batches_classes": [int((c > 0).sum()) for c in counts[:5]],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("shards", help="data.train_shards (brace pattern, folder or glob)")
    p.add_argument("--model", required=True, help="a model folder (its tokenizer)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--no-resampled", action="store_true", help="data.resampled=false")
    a = p.parse_args(argv)
    dm = WebDataModule(
        a.shards,
        a.model,
        resolution=a.resolution,
        batch_size=a.batch_size,
        num_workers=a.workers,
        shuffle_buffer=a.shuffle_buffer,
        resampled=not a.no_resampled,
    )
    m = mixing(class_counts(dm, a.steps))
    print(
        f"{m['classes']} classes, {a.workers} workers, batch {a.batch_size}: a class's share "
        f"varies by {m['step_sd']:.4f} step to step (uniform {m['step_sd_uniform']:.4f}), "
        f"{m['window_sd']:.4f} over {WINDOW} steps (uniform {m['window_sd_uniform']:.4f}); "
        f"over {WINDOW} steps from {m['window_min']:.3f} to {m['window_max']:.3f}; "
        f"classes in the first 5 batches: {m['first_batches_classes']}"
    )
    return m


if __name__ == "__main__":
    main()
