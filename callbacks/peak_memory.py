"""Peak device memory of a run, written to a JSON file (for scripts/experiment_memory.py):

    sdtrain-train ... +callbacks.peak_memory._target_=sdtrain.callbacks.peak_memory.PeakMemory \
        +callbacks.peak_memory.path=peak.json

`steps_*`: the peak over the training steps, read after the last step's other callbacks (a
sampling or validation round at that step included, the end-of-run rounds not); `run_*`: the
peak of the whole run, read when fit ends (end-of-run rounds included). `*_reserved`: what
PyTorch's caching allocator took from the driver (`torch.cuda.max_memory_reserved`; a card needs
this plus the CUDA context); `*_allocated`: what tensors held at most. Bytes; on a CPU only the
device and steps are written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class PeakMemory(L.Callback):
    """Records the device's peak memory after the steps and at the end of fit; writes `path`.

    Args:
        path: the JSON file written when fit ends (rank 0).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.result: dict[str, Any] = {}

    @staticmethod
    def _peaks(device: torch.device, prefix: str) -> dict[str, int]:
        if device.type != "cuda":
            return {}
        return {
            f"{prefix}_reserved": torch.cuda.max_memory_reserved(device),
            f"{prefix}_allocated": torch.cuda.max_memory_allocated(device),
        }

    # The strategy's device, not the module's: by on_fit_end Lightning has moved the module back
    # to the CPU, and the whole run's peak and the GPU's name went unrecorded (H100, 2026-12-07).
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        device = trainer.strategy.root_device
        self.result |= self._peaks(device, "steps") | {"steps": trainer.global_step}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        self.result |= self._peaks(device, "run") | {"device": device.type}
        if device.type == "cuda":
            self.result["gpu"] = torch.cuda.get_device_name(device)
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.result, indent=1) + "\n")
