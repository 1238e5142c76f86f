"""Small tensors onto a device without a host sync: per-step counters and scalars."""

from __future__ import annotations

import torch


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a host sync: a plain copy to a GPU waits for every
    kernel queued before it, so per-step counters go through (cached) pinned memory instead."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def scalar(value: float, device: torch.device) -> torch.Tensor:
    """A float as a 0-d tensor on `device`, filled there (no host-to-device copy, no sync)."""
    return torch.full((), float(value), device=device)
