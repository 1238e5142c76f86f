"""Training-state bytes per trainable weight for each optimizer, and the host-held EMA's work.

    python scripts/memory_savers.py [--json out.json] [--ema-seconds]

For SD-1.5's and SDXL base's U-Net shapes (`scripts/shaped_models.py`; parameters made on the
meta device, nothing downloaded), each optimizer steps once on one tensor of every distinct
parameter shape (CPU; the state's size is the same on a GPU), and its state bytes are summed over
all the U-Net's parameters. Printed with the fp32 EMA's 4 bytes per weight, which
`model.ema.device=cpu` moves off the GPU. `--ema-seconds` also times one update of a host-held
EMA of SD-1.5's size on this CPU (the host's work once every `model.ema.update_every` steps; the
copy from the GPU comes on top, ~0.14 s at 25 GB/s for SD-1.5's 3.4 GB).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from functools import partial

import torch
from shaped_models import SDXL_UNET  # scripts/ is on the path: this file runs as a script


def optimizers() -> dict[str, partial]:
    """The optimizers of README "Memory savers and other optimizers", as configured there."""
    import bitsandbytes as bnb
    import prodigyopt
    import schedulefree

    return {
        "torch.optim.AdamW": partial(torch.optim.AdamW, lr=1e-5),
        "bitsandbytes.optim.AdamW8bit": partial(bnb.optim.AdamW8bit, lr=1e-5),
        "prodigyopt.Prodigy": partial(prodigyopt.Prodigy, lr=1.0),
        "prodigyopt.Prodigy slice_p=11": partial(prodigyopt.Prodigy, lr=1.0, slice_p=11),
        "schedulefree.AdamWScheduleFree": partial(schedulefree.AdamWScheduleFree, lr=1e-5),
    }


def unet_shapes(family: str) -> Counter:
    """How many parameters of each shape the family's U-Net has (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    config = SDXL_UNET if family == "sdxl" else {"cross_attention_dim": 768}  # SD-1.5: defaults
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return Counter(tuple(p.shape) for p in unet.parameters())


def state_bytes(make: partial, shape: tuple[int, ...]) -> int:
    """Bytes of optimizer state one parameter of `shape` has after a step."""
    p = torch.nn.Parameter(torch.randn(shape) * 0.02)
    p.grad = torch.randn(shape) * 1e-3
    opt = make([p])
    if hasattr(opt, "train"):  # schedule-free: steps in train mode
        opt.train()
    opt.step()
    tensors = [v for v in opt.state[p].values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def ema_update_seconds(shapes: Counter) -> dict[str, float]:
    """One update of an EMA of these parameters held on the host: the default (in place, one
    foreach lerp) and `device="cpu"`'s chunked path, on this CPU."""
    from sdtrain.training.ema import EMA

    params = [
        (f"p{i}_{j}", torch.nn.Parameter(torch.randn(s)))
        for i, (s, n) in enumerate(shapes.items())
        for j in range(n)
    ]
    out = {}
    for name, ema in (("default", EMA(0.999)), ("host_chunked", EMA(0.999, device="cpu"))):
        ema.attach(params)
        t0 = time.perf_counter()
        ema.update(params, step=1)
        out[name] = round(time.perf_counter() - t0, 3)
        ema.shadow = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the numbers to this file too")
    ap.add_argument("--ema-seconds", action="store_true", help="time a host EMA update (SD-1.5)")
    a = ap.parse_args()
    torch.manual_seed(0)
    shapes = {family: unet_shapes(family) for family in ("sd15", "sdxl")}
    weights = {f: sum(torch.Size(s).numel() * n for s, n in c.items()) for f, c in shapes.items()}
    every = Counter()
    for c in shapes.values():
        every.update({s: 1 for s in c})
    rows = {}
    for name, make in optimizers().items():
        per_shape = {s: state_bytes(make, s) for s in every}
        rows[name] = {f: sum(per_shape[s] * n for s, n in c.items()) for f, c in shapes.items()}
    print(
        f"U-Net weights: SD-1.5 {weights['sd15'] / 1e6:.1f} M, SDXL {weights['sdxl'] / 1e6:.1f} M"
    )
    print(f"{'optimizer state':34} {'B/weight':>8} {'SD-1.5 GB':>10} {'SDXL GB':>9}")
    for name, by in rows.items():
        b = by["sd15"] / weights["sd15"]
        print(f"{name:34} {b:8.3f} {by['sd15'] / 1e9:10.2f} {by['sdxl'] / 1e9:9.2f}")
    ema = {f: 4 * w for f, w in weights.items()}
    print(f"{'EMA shadow (fp32)':34} {4:8.3f} {ema['sd15'] / 1e9:10.2f} {ema['sdxl'] / 1e9:9.2f}")
    result = {"weights": weights, "optimizer_state_bytes": rows, "ema_bytes": ema}
    if a.ema_seconds:
        result["ema_update_s_sd15_cpu"] = ema_update_seconds(shapes["sd15"])
        print("one EMA update of SD-1.5's size on this CPU (s):", result["ema_update_s_sd15_cpu"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
