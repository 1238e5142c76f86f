"""A ledger of the samples trained on: one line per sample, `step<TAB>key`, in
`<dirpath>/rank<r>.tsv`, written as each batch starts and flushed at once.

For audits (which samples did this run see, how often) and for the resume tests: a run killed and
resumed appends to the same files, so the steps it trained twice appear twice; the last lines for
a step are the ones its weights hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from sdtrain.datamodules.batch import KEYS


class SampleLedger(Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.file = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.file = open(self.dirpath / f"rank{trainer.global_rank}.tsv", "a")  # noqa: SIM115

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self.file is None or not isinstance(batch, dict) or KEYS not in batch:
            return
        step = trainer.global_step
        self.file.write("".join(f"{step}\t{key}\n" for key in batch[KEYS]))
        self.file.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_ledger(path: str | Path) -> dict[int, list[str]]:
    """{step: keys} from a ledger file, the last writer of each step winning (a resumed run
    trains again the steps after its checkpoint)."""
    steps: dict[int, list[str]] = {}
    last_step = None
    for line in Path(path).read_text().splitlines():
        step_text, key = line.split("\t")
        step = int(step_text)
        if step != last_step:  # a step's lines come together: a new block replaces an old one
            steps[step] = []
            last_step = step
        steps[step].append(key)
    return dict(sorted(steps.items()))
