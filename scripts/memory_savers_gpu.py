"""Peak GPU memory and step time of U-Net training with each memory saver (one CUDA GPU).

    python scripts/memory_savers_gpu.py --family sdxl --px 1024 --batch 1 [--json out.json]

A random U-Net of the family's real shapes (`scripts/shaped_models.py`: SD-1.5 860 M, SDXL base
2.57 B), trained as sdtrain's step does (bf16 autocast, fp32 weights, v-prediction MSE on random
latents and text context, clip, optimizer step, EMA update), a few steps per variant; the frozen
VAE and text encoders are left out (with cached latents and text they need not be on the GPU).
Each variant reports torch.cuda.max_memory_allocated over its steps and the median step time.
`--tiny` runs toy widths on whatever device there is (a CPU dry run of the code paths: times
only, no memory numbers).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from functools import partial

import torch
from shaped_models import (
    SDXL_UNET,
    TINY_SDXL_UNET,
)  # scripts/ is on the path: this file runs as a script

from sdtrain.training import optimizers as opts
from sdtrain.training.ema import EMA


def optimizer(name: str):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return partial(bnb.optim.AdamW8bit, lr=1e-5)
    if name == "schedulefree":
        import schedulefree

        return partial(schedulefree.AdamWScheduleFree, lr=1e-5)
    if name == "prodigy":
        import prodigyopt

        return partial(prodigyopt.Prodigy, lr=1.0)
    return partial(torch.optim.AdamW, lr=1e-5, fused=True)


VARIANTS = {  # name: (optimizer, ema device ("gpu", "cpu" or None: no EMA), checkpointing)
    "adamw+ema": ("adamw", "gpu", False),
    "adamw+ema_cpu": ("adamw", "cpu", False),
    "adamw8bit+ema": ("adamw8bit", "gpu", False),
    "adamw8bit+ema_cpu": ("adamw8bit", "cpu", False),
    "adamw+ema+ckpt": ("adamw", "gpu", True),
    "adamw8bit+ema_cpu+ckpt": ("adamw8bit", "cpu", True),
    "adamw8bit+no_ema+ckpt": ("adamw8bit", None, True),
    "schedulefree+ema_cpu+ckpt": ("schedulefree", "cpu", True),
    "prodigy+ema_cpu+ckpt": ("prodigy", "cpu", True),
}


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_unet(family: str, tiny: bool):
    from diffusers import UNet2DConditionModel

    config = SDXL_UNET if family == "sdxl" else {"cross_attention_dim": 768}
    if tiny:  # toy widths, the family's structure
        config = TINY_SDXL_UNET if family == "sdxl" else {
            "cross_attention_dim": 32, "block_out_channels": (32, 64, 64, 64),
            "attention_head_dim": 2, "norm_num_groups": 16,
        }  # fmt: skip
    with torch.device(DEVICE):
        return UNet2DConditionModel(**config)


def inputs(unet, family: str, px: int, batch: int):
    c = unet.config
    latents = torch.randn(batch, 4, px // 8, px // 8, device=DEVICE)  # (B, 4, H/8, W/8)
    context = torch.randn(batch, 77, c.cross_attention_dim, device=DEVICE)
    extra = {}
    if family == "sdxl":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, device=DEVICE),  # SDXL: 1280
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, device=DEVICE).float(),
        }
    return latents, context, extra


def run(unet, family: str, px: int, batch: int, variant: str, steps: int) -> dict:
    name, ema_device, ckpt = VARIANTS[variant]
    unet.train()
    if ckpt:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    params = [p for p in unet.parameters()]
    named = list(unet.named_parameters())
    opt = opts.build(optimizer(name), params)
    ema = None
    if ema_device is not None:  # "gpu": beside the weights (the default), "cpu": on the host
        ema = EMA(0.999, device="cpu" if ema_device == "cpu" else None)
    if ema is not None:
        ema.attach(named)
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, ema_times = [], []
    latents, context, extra = inputs(unet, family, px, batch)
    for _ in range(steps):
        t0 = time.perf_counter()
        opts.train_mode([opt])
        t = torch.randint(0, 1000, (batch,), device=DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = unet(latents, t, context, **extra).sample
        loss = torch.nn.functional.mse_loss(out.float(), latents)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        opts.eval_mode([opt])
        sync()
        t1 = time.perf_counter()
        if ema is not None:
            ema.update(named, step=1)
        sync()
        t2 = time.perf_counter()
        times.append(t2 - t0)
        ema_times.append(t2 - t1)
    state = sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.is_cuda
    )
    result = {
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEVICE == "cuda" else None,
        "optimizer_state_gpu_gb": round(state / 1e9, 2),
        "ema_gpu_gb": round(
            sum(v.numel() * 4 for v in ema.shadow.values() if v.is_cuda) / 1e9 if ema else 0.0, 2
        ),
        "step_s_median": round(statistics.median(times[1:]), 3),
        "ema_update_s_median": round(statistics.median(ema_times[1:]), 3),
    }
    del opt, ema
    for p in params:
        p.grad = None
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sdxl", choices=("sd", "sdxl"))
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="toy widths: a dry run on any device")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    unet = build_unet(a.family, a.tiny)
    weights = sum(p.numel() for p in unet.parameters())
    print(
        f"{a.family} U-Net {weights / 1e6:.1f} M weights, {a.px} px x {a.batch}, {device_name()}",
        flush=True,
    )
    results = {}
    for v in a.variants:
        try:
            results[v] = run(unet, a.family, a.px, a.batch, v, a.steps)
        except torch.OutOfMemoryError:
            results[v] = {"peak_gb": "OOM"}
            gc.collect()
            torch.cuda.empty_cache()
        print(v, results[v], flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "family": a.family,
                    "px": a.px,
                    "batch": a.batch,
                    "weights": weights,
                    "device": device_name(),
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
