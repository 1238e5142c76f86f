"""ThroughputMonitor: its arithmetic, the U-Net FLOP count, the window bookkeeping, a real run."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sdtrain.artifacts import checkpoint
from sdtrain.callbacks.throughput import (
    ThroughputMonitor,
    mfu,
    peak_flops_for,
    unet_input_shapes,
    unet_train_flops,
    wait_fraction,
)
from sdtrain.cli.train import train
from sdtrain.models.loader import load_parts
from tests.conftest import compose_cfg, tiny_overrides


@pytest.fixture(scope="module")
def parts(tiny_model: Path):
    return load_parts(tiny_model)


def test_mfu_and_wait_fraction_by_hand():
    # SD-1.5 at 512 px (2.41 TFLOP per image) at 145 img/s on an H100 SXM: 349.45 / 989 TFLOP/s
    assert mfu(2.41e12, 145.0, 989e12) == pytest.approx(0.35334, abs=1e-5)
    assert mfu(1e9, 2.0, 4e9) == 0.5
    assert wait_fraction(3.0, 15.0) == pytest.approx(0.2)
    assert wait_fraction(0.0, 0.0) == 0.0


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_by_device_name(name: str, peak: float | None):
    assert peak_flops_for(name) == peak


def test_unet_input_shapes_from_each_batch_form(parts):
    unet, vae, text = parts.unet, parts.vae, parts.text_encoder  # VAE factor 2, context dim 32
    ids = torch.zeros(2, 77, dtype=torch.long)
    forms = [
        ({"pixels": torch.zeros(2, 3, 32, 48), "input_ids": ids}, ((1, 4, 16, 24), (1, 77, 32))),
        (
            {"latent_dist": torch.zeros(2, 8, 16, 16), "input_ids": ids},
            ((1, 4, 16, 16), (1, 77, 32)),
        ),
        (
            {"latents": torch.zeros(2, 4, 8, 8), "context": torch.zeros(2, 10, 32)},
            ((1, 4, 8, 8), (1, 10, 32)),
        ),
    ]
    for batch, shapes in forms:
        assert unet_input_shapes(batch, unet, vae, text) == shapes, sorted(batch)


def test_unet_flops_scale_with_latent_area_and_leave_training_alone(parts):
    unet = parts.unet.train()
    for p in unet.parameters():
        p.grad = torch.full_like(p, 0.5)
    rng = torch.get_rng_state()
    small = unet_train_flops(unet, (1, 4, 16, 16), (1, 77, 32))
    large = unet_train_flops(unet, (1, 4, 32, 32), (1, 77, 32))
    assert unet_train_flops(unet, (2, 4, 16, 16), (2, 77, 32)) == small  # per image
    # convolutions and linear layers scale 4x with the area, self-attention scores 16x: the tiny
    # U-Net's attention (head dim 8) is a large share, so it lands well above 4
    assert small > 0 and 4.0 <= large / small <= 8.0, (small, large)
    assert unet.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in unet.parameters())
    unet.zero_grad(set_to_none=True)


def test_sd15_costs_match_the_performance_model():
    """DESIGN.md's SD-1.5 U-Net training costs, counted on the meta device (no memory, no maths)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD-1.5's blocks
    at_256 = unet_train_flops(unet, (1, 4, 32, 32), (1, 77, 768))
    at_512 = unet_train_flops(unet, (1, 4, 64, 64), (1, 77, 768))
    assert at_256 == pytest.approx(0.54e12, rel=0.01)
    assert at_512 == pytest.approx(2.41e12, rel=0.01)


def test_three_forwards_match_a_counted_forward_and_backward(parts):
    unet = parts.unet
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with sdpa_kernel(SDPBackend.MATH):  # attention as plain matmuls, counted both ways
        convention = unet_train_flops(unet, (1, 4, 16, 16), (1, 77, 32))
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor([10]), encoder_hidden_states=context).sample.sum().backward()
    unet.zero_grad(set_to_none=True)
    assert counter.get_total_flops() == pytest.approx(convention, rel=0.03)


class TinyNet(torch.nn.Module):
    """Called like a U-Net; small enough to compile in a test."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def forward(self, x, t, encoder_hidden_states):
        return self.proj(x).relu() + encoder_hidden_states.mean()


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch < 2.6")
def test_count_leaves_a_compiled_unet_to_compile():
    """Dynamo never compiles a module whose first call ran under a FLOP counter: the count must
    not be that first call, or a compiled run would silently train eagerly."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    net = TinyNet()
    net.compile(backend=backend)
    assert unet_train_flops(net, (1, 4, 8), (1, 3, 8)) == 3 * 2 * 4 * 8 * 8  # one (4, 8) @ (8, 8)
    assert not graphs
    net(torch.ones(1, 4, 8), torch.zeros(1), torch.ones(1, 3, 8)).sum().backward()
    assert len(graphs) == 1


class Recorder:
    def __init__(self):
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, metrics))


def test_windows_count_micro_batches_and_loader_wait():
    """Two ranks, 2 micro-batches of 4 images per optimizer step, window 2: by a fake clock,
    each micro-batch waits 1 s for data and computes 3 s (the first one waits before timing)."""
    cb = ThroughputMonitor(window=2, peak_flops=4e9)
    cb.flops_per_img = 1e9  # counted already: the fake module has no U-Net
    now = [0.0]
    cb.clock = lambda: now[0]
    trainer = SimpleNamespace(
        global_step=0, world_size=2, is_global_zero=True, loggers=[Recorder()]
    )
    module = SimpleNamespace(device=torch.device("cpu"))
    batch = {"latents": torch.zeros(4, 4, 8, 8), "context": torch.zeros(4, 77, 32)}
    cb.on_train_start(trainer, module)
    for micro in range(8):
        now[0] += 0 if micro == 0 else 1.0
        cb.on_train_batch_start(trainer, module, batch, micro)
        now[0] += 3.0
        trainer.global_step += micro % 2  # the optimizer steps after every second micro-batch
        cb.on_train_batch_end(trainer, module, None, batch, micro)
    (step1, first), (step3, second) = trainer.loggers[0].rows
    # first window: 16 images in 15 s, 3 s of it waiting; second: 16 images in 16 s, 4 s waiting
    assert (step1, step3) == (1, 3)
    assert first["perf/img_per_s_per_device"] == pytest.approx(16 / 15)
    assert first["perf/img_per_s"] == pytest.approx(32 / 15)
    assert first["perf/data_wait_frac"] == pytest.approx(0.2)
    assert first["perf/mfu"] == pytest.approx(1e9 * 16 / 15 / 4e9)
    assert second == pytest.approx(
        {
            "perf/img_per_s": 2.0,
            "perf/img_per_s_per_device": 1.0,
            "perf/data_wait_frac": 0.25,
            "perf/mfu": 0.25,
        }
    )


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"callbacks.throughput.window=0"):
        ThroughputMonitor(window=0)
    with pytest.raises(ValueError, match=r"callbacks.throughput.peak_flops=-1"):
        ThroughputMonitor(peak_flops=-1)


def test_real_run_logs_perf_and_leaves_training_unchanged(
    tiny_model: Path, shards: str, tmp_path: Path
):
    base = [
        o for o in tiny_overrides(tiny_model, shards, 4) if not o.startswith("callbacks.sample")
    ] + ["~callbacks.sample_images"]
    monitored = base + [
        "logger=csv",
        "callbacks.throughput.window=2",
        "callbacks.throughput.peak_flops=1e12",
    ]
    train(compose_cfg(tmp_path / "with", monitored))
    train(compose_cfg(tmp_path / "without", base + ["logger=none", "~callbacks.throughput"]))

    (metrics,) = (tmp_path / "with").glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    perf = [r for r in rows if r["perf/img_per_s"]]
    assert [int(r["step"]) for r in perf] == [1, 3]
    for r in perf:
        assert float(r["perf/img_per_s"]) == pytest.approx(float(r["perf/img_per_s_per_device"]))
        assert float(r["perf/img_per_s"]) > 0
        assert 0 <= float(r["perf/data_wait_frac"]) <= 1
        assert float(r["perf/mfu"]) > 0
    assert "perf/peak_mem_gb" not in rows[0]  # CPU: no CUDA memory to report
    (flops,) = [float(r["perf/flops_per_img"]) for r in rows if r["perf/flops_per_img"]]
    assert flops > 0

    # the FLOP count ran in one run and not the other; the weights are the same to the bit
    with_cb = checkpoint.load(tmp_path / "with" / "checkpoints" / "last.ckpt")["state_dict"]
    without = checkpoint.load(tmp_path / "without" / "checkpoints" / "last.ckpt")["state_dict"]
    assert with_cb.keys() == without.keys()
    assert all(torch.equal(v, without[k]) for k, v in with_cb.items())
