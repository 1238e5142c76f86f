"""Peak host memory of the EMA's swap and checkpoint paths on an SD-1.5-size U-Net (CPU, fp32):
what `module.ema_weights()` (sampling, validation) and a non-writing rank's EMA state cost on top
of the weights and the shadow (issue 26 item 8; docs/benchmarks.md).

    python scripts/memory_sd15.py

Peaks are read from the kernel (VmHWM in /proc/self/status, reset through /proc/self/clear_refs
before each scope), so they count every allocation, not only the ones torch reports. Linux only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

GB = 1e9


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_above_now(scope: Callable[[], object]) -> float:
    """GB the resident set rose above its level at the start while `scope` ran."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = status_kb("VmRSS")
    kept = scope()
    rise = (status_kb("VmHWM") - start) * 1e3 / GB
    del kept
    return rise


def main() -> None:
    from diffusers import UNet2DConditionModel

    from sdtrain.training.ema import EMA

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD-1.5's blocks
    params = [(n, p) for n, p in unet.named_parameters()]
    weights_gb = sum(p.numel() * p.element_size() for _, p in params) / GB
    ema = EMA(decay=0.9999, warmup=False)
    ema.attach(params)

    def swap() -> None:
        with ema.swapped_in(params):
            pass

    def clone_all() -> dict:  # what ema_weights() did before: a copy of every trainable weight
        return {n: p.detach().clone() for n, p in params}

    result = {
        "unet_params": sum(p.numel() for _, p in params),
        "weights_gb": round(weights_gb, 3),
        "ema_weights_swap_peak_gb": round(peak_above_now(swap), 3),
        "clone_every_weight_peak_gb (before)": round(peak_above_now(clone_all), 3),
        "ema_state_non_writing_rank_peak_gb": round(
            peak_above_now(lambda: ema.state_dict(gather=True, writes=False)), 3
        ),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
