"""A callback that records where the offloaded frozen parts are (for tests, via config).

`+callbacks.offload_probe._target_=tests.training.offload_probe.OffloadProbe`: at every training
batch's start and end it records `module.offload.placement()`, the parts' parameter devices,
whether they are registered submodules, and (CUDA) the bytes allocated; a forward pre-hook on
the VAE and the text encoder records each time they run (step, placement, device). The last
instance made is `OffloadProbe.last`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

PARTS = ("vae", "text_encoder")


class OffloadProbe(L.Callback):
    last: OffloadProbe | None = None

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []  # one per batch hook
        self.calls: list[dict[str, Any]] = []  # one per forward of a frozen part
        self.registered: set[str] = set()  # frozen parts among the module's submodules at fit
        OffloadProbe.last = self

    def on_fit_start(self, trainer, pl_module) -> None:
        self.registered = {n for n, _ in pl_module.named_children() if n in PARTS}
        for name in PARTS:  # the VAE's encoder and decoder (encode / decode, not forward)
            for child in getattr(pl_module, name).children():
                child.register_forward_pre_hook(self._hook(name, trainer, pl_module))

    def _hook(self, name: str, trainer, pl_module):
        def record(module, args) -> None:
            self.calls.append(self._state(trainer, pl_module) | {"part": name})

        return record

    def _state(self, trainer, pl_module) -> dict[str, Any]:
        devices = {n: next(getattr(pl_module, n).parameters()).device.type for n in PARTS}
        state = {
            "step": trainer.global_step,
            "placement": dict(pl_module.offload.placement()),
            "devices": devices,
        }
        if pl_module.device.type == "cuda":
            # cuBLAS keeps a workspace per handle in the caching allocator from its first matmul:
            # a run whose frozen parts ran on the GPU before step 0 holds one there, an offloaded
            # run not yet (seen on an H100: 7.6 MB more at step 0). Freed here, as PyTorch's own
            # memory tests do, so only tensors count; the next matmul makes it again.
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                torch.cuda.synchronize(pl_module.device)
                clear()
            state["allocated"] = torch.cuda.memory_allocated(pl_module.device)
        return state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(self._state(trainer, pl_module) | {"hook": "start"})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(self._state(trainer, pl_module) | {"hook": "end"})
