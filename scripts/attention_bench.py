"""Time the SD-1.5 U-Net's attention modules alone (forward + backward, bf16 autocast, compiled),
per processor and SDPA kernel, and how much of that time is memory copies (docs/benchmarks.md).

    python scripts/attention_bench.py --batch 64 --px 512 --out attention.json

Each row: processor ("diffusers": AttnProcessor2_0; "fused": sdtrain.models.attention.FusedProjections;
"pad64" / "fused_pad64": heads zero-padded to 64 for the kernel, model.attention_pad_heads=64),
kernel (PyTorch's choice, cudnn, flash, efficient), and the milliseconds of one U-Net step's worth
of attention (each shape times how often SD-1.5 has it), of which copy kernels.
"""

from __future__ import annotations

import argparse
import json

import torch

# (tokens per side at 512 px / 8, channels, how many transformer blocks): SD-1.5's U-Net
LEVELS = [(1, 320, 5), (2, 640, 5), (4, 1280, 5), (8, 1280, 1)]


def _module(channels: int, cross: bool):
    from diffusers.models.attention_processor import Attention

    return Attention(
        channels,
        cross_attention_dim=768 if cross else None,
        heads=8,
        dim_head=channels // 8,
        bias=False,
        out_bias=True,
    )


def _time(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def _copy_ms(fn) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = ("copy", "elementwise_kernel", "clone", "contiguous")
    return (
        sum(
            e.device_time_total
            for e in prof.key_averages()
            if e.device_time_total
            and any(n in e.key.lower() for n in names)
            and "gemm" not in e.key
        )
        / 1000
    )


PROCESSORS = {
    "diffusers": None,
    "fused": (True, None),
    "pad64": (False, 64),
    "fused_pad64": (True, 64),
}


def _set(attn, processor: str):
    from sdtrain.models.attention import FusedProjections

    if PROCESSORS[processor] is not None:
        attn.set_processor(FusedProjections(*PROCESSORS[processor]))
    return attn


def max_diff(processor: str, a) -> float:
    """Largest |difference| from diffusers' processor on SD-1.5's widest self-attention (40-wide
    heads), forward, bf16 autocast, the same weights and input: bf16 noise is ~1e-2."""
    torch.manual_seed(0)
    attn = _module(320, False).cuda()
    x = torch.randn(min(a.batch, 8), (a.px // 8) ** 2, 320, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = attn(x).float()
        got = _set(attn, processor)(x).float()
    return (got - want).abs().max().item()


def case(processor: str, kernel: str | None, a) -> dict:
    from sdtrain.models.speed import set_attention

    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    torch.backends.cuda.enable_cudnn_sdp(True)
    set_attention(kernel)
    torch._dynamo.reset()
    total = copies = 0.0
    side = a.px // 8
    for div, channels, count in LEVELS:
        tokens = (side // div) ** 2
        for cross in (False, True):
            attn = _set(_module(channels, cross).cuda(), processor)
            x = torch.randn(a.batch, tokens, channels, device="cuda", requires_grad=True)
            ctx = torch.randn(a.batch, 77, 768, device="cuda") if cross else None
            fwd = torch.compile(lambda x, ctx, attn=attn: attn(x, encoder_hidden_states=ctx))

            def step(fwd=fwd, x=x, ctx=ctx):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = fwd(x, ctx)
                out.float().square().mean().backward()

            total += _time(step, a.steps) * count
            copies += _copy_ms(step) * count
    return dict(processor=processor, kernel=kernel, batch=a.batch, px=a.px,
                ms_per_unet_step=round(total, 2), copy_ms=round(copies, 2),
                max_diff=max_diff(processor, a))  # fmt: skip


def profile_one(a) -> None:
    """Print the operators and kernels of one compiled forward + backward of the U-Net's largest
    self-attention (64 x 64 latents, 320 channels) by GPU time, to see where its copies come from."""
    from torch.profiler import ProfilerActivity, profile

    for processor in a.processors:
        torch._dynamo.reset()
        attn = _set(_module(320, False).cuda(), processor)
        x = torch.randn(a.batch, (a.px // 8) ** 2, 320, device="cuda", requires_grad=True)
        fwd = torch.compile(lambda x, attn=attn: attn(x))

        def step(fwd=fwd, x=x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fwd(x)
            out.float().square().mean().backward()

        _time(step, 2)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"== {processor}: one step of the 4096-token self-attention, batch {a.batch}")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=22))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--px", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--processors", nargs="+", default=list(PROCESSORS), choices=list(PROCESSORS))
    p.add_argument("--kernels", nargs="+", default=["default", "cudnn", "flash", "efficient"])
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true", help="print the largest case's profile")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if a.profile:
        profile_one(a)
        return
    rows = []
    for kernel in a.kernels:
        for processor in a.processors:
            row = case(processor, None if kernel == "default" else kernel, a)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
