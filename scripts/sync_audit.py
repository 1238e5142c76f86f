"""Where a training run makes the host wait for the GPU: `sdtrain-train` with CUDA's sync debug
mode on, each synchronizing call's Python stack counted once per place.

A host sync per step stalls the CPU until the GPU's queue drains, so Lightning's hooks, the
loader hand-off and the next kernel launches no longer overlap GPU work. A place counted about
once per step (steps = trainer.max_steps) is a per-step sync; those counted once per logging or
throughput window are the intended ones.

    python scripts/sync_audit.py model.pretrained=... data=latents data.train_shards=... \\
        trainer=gpu trainer.max_steps=30
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings

import torch

SKIP = ("warnings.py", "sync_audit.py", "/torch/nn/modules/module.py")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("sync_audit.py counts where the CPU waits for a CUDA GPU: run it on one")
    places: collections.Counter[str] = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith(SKIP)]
        places["".join(traceback.format_list(stack[-10:]))] += 1

    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    from sdtrain.cli.train import main as train

    try:
        train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        print(f"\n{sum(places.values())} synchronizing calls in {len(places)} places")
        for stack, n in places.most_common():
            print(f"\n=== {n} x\n{stack}")


if __name__ == "__main__":
    main()
