"""Does Inductor fuse the U-Net's GroupNorm + SiLU and its GeGLU (issue 29 item 2)?

    python scripts/fusion_check.py                 # SD-1.5's shapes at 512 px, batch 8 (a GPU)
    python scripts/fusion_check.py --tiny          # toy shapes, any device (what the test runs)

Compiles diffusers' own `ResnetBlock2D` (GroupNorm -> SiLU -> conv, twice) and `FeedForward`
with `activation_fn="geglu"` (one matmul, then GELU(gate) * hidden) the way `model.compile` does,
runs one forward and backward (bf16 autocast on a GPU), and reads the code Inductor generated.
Inductor names each generated kernel after the ATen ops fused into it (`triton_..._fused_
native_group_norm_silu_...` on a GPU, `cpp_fused_...` on a CPU), so a kernel whose name holds
both ops computes both in one pass over memory. Prints those kernels, a verdict for each pattern
in the forward and the backward graph, and the compiled module's largest difference from the
eager diffusers module (outputs and input gradients).
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from torch._inductor.utils import run_and_get_code

PATTERNS = {  # pattern: (module, the ops that must share a forward / a backward kernel)
    "groupnorm_silu": ("resnet", ("native_group_norm", "silu"), ("group_norm_backward", "silu")),
    "geglu": ("geglu", ("gelu", "mul"), ("gelu_backward", "mul")),
}


def modules(tiny: bool) -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D

    ch, temb, px, batch, tokens = (64, 128, 16, 2, 64) if tiny else (320, 1280, 64, 8, 4096)
    resnet = ResnetBlock2D(in_channels=ch, out_channels=ch, temb_channels=temb, groups=32)
    geglu = FeedForward(ch, activation_fn="geglu")
    return {
        "resnet": (resnet, (torch.randn(batch, ch, px, px), torch.randn(batch, temb))),
        "geglu": (geglu, (torch.randn(batch, tokens, ch),)),
    }


def step(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], device: str):
    """One forward and backward; the output and the first input's gradient."""
    x = inputs[0].detach().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out = module(x, *inputs[1:])
    out.float().square().mean().backward()
    return out.float().detach(), x.grad.float()


def kernels(code: str) -> list[str]:
    return sorted(set(re.findall(r"\b(?:triton|cpp)_\w*fused_\w+", code)))


def check(name: str, module, inputs, device: str) -> dict:
    module = module.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    torch.manual_seed(0)
    eager_out, eager_grad = step(module, inputs, device)
    module.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    (out, grad), codes = run_and_get_code(step, torch.compile(module), inputs, device)
    forward, backward = (kernels(c) for c in codes[:2])
    return {
        "forward_kernels": forward,
        "backward_kernels": backward,
        "max_diff_out": (out - eager_out).abs().max().item(),
        "max_diff_grad": (grad - eager_grad).abs().max().item(),
    }


def fused(names: list[str], ops: tuple[str, ...]) -> list[str]:
    """The kernels whose names hold every op in `ops`."""
    return [n for n in names if all(op in n for op in ops)]


def run(tiny: bool, device: str) -> dict:
    built = modules(tiny)
    report = {}
    for pattern, (which, fwd_ops, bwd_ops) in PATTERNS.items():
        got = check(which, *built[which], device)
        got["forward_fused"] = fused(got["forward_kernels"], fwd_ops)
        got["backward_fused"] = fused(got["backward_kernels"], bwd_ops)
        report[pattern] = got
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy shapes (any device)")
    ap.add_argument("--json", help="write the report here too")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = run(a.tiny, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}")
    for pattern, got in report.items():
        print(
            f"{pattern}: forward fused {bool(got['forward_fused'])} {got['forward_fused']}; "
            f"backward fused {bool(got['backward_fused'])} {got['backward_fused']}; "
            f"max |compiled - eager| out {got['max_diff_out']:.3g} grad {got['max_diff_grad']:.3g}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, **report}, f, indent=1)


if __name__ == "__main__":
    main()
