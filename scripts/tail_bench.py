"""Time the pipeline's per-step work after backward on the SD-1.5 U-Net's parameters (one GPU):
the non-finite check, gradient clipping and the EMA update, each as sdtrain runs it now and as it
ran before (docs/benchmarks.md, "Eighth measurement").

    python scripts/tail_bench.py --out tail.json

Rows (milliseconds of GPU time a step, CUDA events, median of --reps):
- ema_lerp_host: the EMA update with a host weight (a synchronous non-finite check ran);
- ema_sub_mul_add: the sync-free EMA update before (a full-size temporary, 8 memory passes);
- ema_lerp_device: the sync-free EMA update now (`sdtrain.training.ema.EMA.update` with `keep`: an
  in-place `lerp_` per large parameter, one foreach update for the small ones);
- check_then_clip: the non-finite check, then `torch.nn.utils.clip_grad_norm_` (two norm reads);
- check_reuse_clip: the check, then `sdtrain.training.nonfinite.clip_with_norm` with its norm (one read).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def _ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    from diffusers import UNet2DConditionModel

    from sdtrain.training.ema import EMA
    from sdtrain.training.nonfinite import NonFiniteGuard, clip_with_norm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(dev)  # SD-1.5 shapes
    named = list(unet.named_parameters())
    params = [q for _, q in named]
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    ema = EMA(decay=0.9999)
    ema.attach(named)
    keep = torch.ones((), device=dev)
    shadow = list(ema.shadow.values())

    def sub_mul_add() -> None:  # the update before this measurement
        delta = torch._foreach_sub(params, shadow)
        torch._foreach_mul_(delta, keep * 1e-4)
        torch._foreach_add_(shadow, delta)

    guard = NonFiniteGuard()

    def check_then_clip() -> None:
        guard.flag(params, 1)
        torch.nn.utils.clip_grad_norm_(params, 1e9)  # a bound never reached: grads unchanged

    def check_reuse_clip() -> None:
        guard.flag(params, 1)
        clip_with_norm(params, 1e9, guard.norm)

    rows = {
        "ema_lerp_host": lambda: ema.update(named, 1),
        "ema_sub_mul_add": sub_mul_add,
        "ema_lerp_device": lambda: ema.update(named, 1, keep),
        "check_then_clip": check_then_clip,
        "check_reuse_clip": check_reuse_clip,
    }
    out = {"gpu": torch.cuda.get_device_name(), "params": sum(q.numel() for q in params)}
    for name, fn in rows.items():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out[name] = {
            "ms": round(_ms(fn, a.reps), 3),
            "extra_mem_gb": round((torch.cuda.max_memory_allocated() - base) / 1e9, 2),
        }
        print(name, out[name], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
