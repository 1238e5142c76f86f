"""Where a training step's time goes: the top kernels of a torch.profiler Chrome trace by time,
and each kind's share (matmul, convolution, attention, normalization, optimizer, communication,
memory copies, the rest), as a Markdown table for docs/benchmarks.md.

Profile the real training with Lightning's PyTorchProfiler (steps 10-14 here, after warm-up):

    sdtrain-train ... trainer.max_steps=15 \\
        '+trainer.profiler={_target_:lightning.pytorch.profilers.PyTorchProfiler,dirpath:prof,filename:step,export_to_chrome:true,record_module_names:false,schedule:{_target_:torch.profiler.schedule,wait:5,warmup:5,active:5}}'
    python scripts/kernel_summary.py prof/*.pt.trace.json --top 15

Keep `record_module_names:false` for a compiled U-Net: Lightning's default puts a profiler hook on
every module, and each hook breaks torch.compile's graph, so the trace would show a U-Net that
runs half eager (measured on an H200: convolutions, norms and their backward outside the graph).

GPU kernels are counted where the trace has them (their time is the GPU's); a CPU-only trace is
summed by each operator's self time (its time less its children's), so nothing counts twice.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

# first match wins: attention first (cuDNN's SDPA kernels are named "..._sdpa_..._flash_fprop_..."),
# then convolutions before matmuls (cuDNN's implicit-GEMM convolutions name both)
KINDS: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("matmul", r"gemm|xmma|cutlass|cublas|nvjet|\bmm\b|addmm|bmm|matmul|linear|_mm_"),
    ("normalization", r"norm|welford"),
    ("optimizer", r"adam|multi_tensor|foreach|lerp"),
    ("communication", r"nccl|c10d|all_?reduce|reduce_scatter|all_?gather|gloo"),
    ("memory copy", r"memcpy|memset|copy_|\bto\b|contiguous"),
)
GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "elementwise and other"


def cpu_self_times(events: list[dict]) -> dict[str, float]:
    """Self time (µs) per CPU operator: each event's duration less its direct children's."""
    by_thread: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op" and e.get("ph") == "X":
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    times: dict[str, float] = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, self time]
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]:
                end, name, own = stack.pop()
                times[name] += own
            if stack:
                stack[-1][2] -= e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], float(e["dur"])])
        for _, name, own in stack:
            times[name] += own
    return times


def summarize(trace: dict) -> tuple[str, dict[str, float]]:
    """("gpu" or "cpu", {name: µs}) from a Chrome trace's events."""
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    gpu: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") in GPU_CATS and e.get("ph") == "X":
            gpu[e["name"]] += float(e["dur"])
    if gpu:
        return "gpu", gpu
    return "cpu", cpu_self_times(events)


def table(where: str, times: dict[str, float], top: int) -> str:
    total = sum(times.values())
    if total <= 0:
        raise ValueError("the trace holds no kernels and no CPU operators with a duration")
    kinds: dict[str, float] = collections.Counter()
    for name, us in times.items():
        kinds[kind_of(name)] += us
    clock = "GPU kernel time" if where == "gpu" else "CPU operator self time"
    lines = [f"{clock}: {total / 1e3:.1f} ms in all", "", "| kind | ms | share |"]
    lines.append("| --- | --- | --- |")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {us / 1e3:.1f} | {us / total:.1%} |")
    lines += [
        "",
        f"Top {top} by time:",
        "",
        "| kernel | kind | ms | share |",
        "| --- | --- | --- | --- |",
    ]
    for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        short = short.replace("|", "\\|")
        lines.append(f"| `{short}` | {kind_of(name)} | {us / 1e3:.2f} | {us / total:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("traces", nargs="+", help="Chrome trace JSON files (summed together)")
    p.add_argument("--top", type=int, default=15, help="kernels listed one by one")
    a = p.parse_args(argv)
    where, times = None, collections.Counter()
    for path in a.traces:
        try:
            trace = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"{path}: not a readable Chrome trace ({e})")
        kind, t = summarize(trace)
        if where is not None and kind != where:
            sys.exit(f"{path}: a {kind} trace among {where} traces; summarize them apart")
        where = kind
        times.update(t)
    try:
        print(table(where, times, a.top))
    except ValueError as e:
        sys.exit(f"{', '.join(a.traces)}: {e}")


if __name__ == "__main__":
    main()
