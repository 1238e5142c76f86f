"""scripts/kernel_summary.py: where a step's time goes, from a torch.profiler Chrome trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import kernel_summary as ks
from sdtrain.cli.train import train
from tests.conftest import compose_cfg, tiny_overrides


def kernel(name: str, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": 0, "dur": dur, "pid": 0, "tid": 7}


def test_gpu_kernels_are_grouped_by_kind_and_cpu_ops_ignored():
    trace = {
        "traceEvents": [
            kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 500),
            kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_nn_n", 50),
            kernel("sm90_xmma_fprop_implicit_gemm_bf16_nhwc", 200),  # a convolution, not a matmul
            kernel("flash_fwd_kernel<Flash_fwd_kernel_traits>", 60),
            # cuDNN's SDPA names "fprop" (a convolution word) and cuBLAS's Hopper "nvjet" matmuls
            # name no gemm: both as an H200 trace has them
            kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", 40),
            kernel("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT", 50),
            kernel("triton_red_fused_native_group_norm_0", 50),
            kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 30),
            kernel("Memcpy HtoD (Pinned -> Device)", 20, cat="gpu_memcpy"),
            {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "ts": 0, "dur": 9999, "tid": 1},
        ]
    }
    where, times = ks.summarize(trace)
    assert where == "gpu" and sum(times.values()) == 1000  # the CPU operator is not counted
    text = ks.table(where, times, top=3)
    assert "GPU kernel time: 1.0 ms in all" in text
    for row in (
        "| matmul | 0.6 | 60.0% |",
        "| convolution | 0.2 | 20.0% |",
        "| attention | 0.1 | 10.0% |",
        "| normalization | 0.1 | 5.0% |",
        "| communication | 0.0 | 3.0% |",
        "| memory copy | 0.0 | 2.0% |",
    ):
        assert row in text
    assert text.count("| `") == 3  # the top 3 kernels, the largest first
    assert text.index("tn_n") < text.index("implicit_gemm") < text.index("flash_fwd")


def test_cpu_operators_count_their_self_time_once():
    """aten::linear (100 µs) calls aten::addmm (80 µs): 20 + 80, not 180."""
    ops = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "ts": 10, "dur": 80, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::gelu", "ts": 100, "dur": 50, "tid": 1},
    ]
    where, times = ks.summarize({"traceEvents": ops})
    assert where == "cpu" and times == {"aten::linear": 20, "aten::addmm": 80, "aten::gelu": 50}


def test_a_real_profiled_run_summarizes(tiny_model: Path, shards: str, tmp_path: Path, capsys):
    """The profiler override in the script's docstring, on the tiny model (CPU operators here)."""
    prof = tmp_path / "prof"
    profiler = (
        "+trainer.profiler={_target_:lightning.pytorch.profilers.PyTorchProfiler,"
        f"dirpath:{prof},filename:step,export_to_chrome:true,"
        "schedule:{_target_:torch.profiler.schedule,wait:1,warmup:1,active:2}}"
    )
    overrides = tiny_overrides(tiny_model, shards, steps=5) + ["logger=none", profiler]
    train(compose_cfg(tmp_path / "run", overrides))
    traces = sorted(str(p) for p in prof.rglob("*.json"))
    assert traces, f"no Chrome trace under {prof}: {list(prof.rglob('*'))}"
    ks.main([*traces, "--top", "5"])
    out = capsys.readouterr().out
    assert "CPU operator self time" in out and "| convolution |" in out
    kinds = out.split("\n\n")[1].splitlines()[2:]  # the rows of the table of kinds
    shares = [float(row.split("|")[3].strip(" %")) for row in kinds]
    assert sum(shares) == pytest.approx(100, abs=0.5)


def test_an_unreadable_trace_is_named(tmp_path: Path):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=str(bad)):
        ks.main([str(bad)])
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(SystemExit, match="no kernels"):
        ks.main([str(empty)])
