"""The EMA kept off the weights' device (model.ema.device=cpu) and updated every N steps: the same
shadow as the default, exact resume, and the training state on the device without it."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdtrain.callbacks.throughput import training_state_bytes
from sdtrain.demo.tiny import build_parts
from sdtrain.training import ema as ema_module
from sdtrain.training.ema import EMA
from sdtrain.training.module import StableDiffusionModule
from tests.training.fitting import fit


def module(device: str | None, every: int = 3) -> StableDiffusionModule:
    return StableDiffusionModule(
        build_parts(32, seed=0),
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
        ema=EMA(decay=0.99, update_every=every, device=device),
    )


def test_chunked_host_update_is_the_plain_lerp(monkeypatch: pytest.MonkeyPatch):
    """The host-held update (weights brought over a chunk at a time through two buffers) gives
    what one foreach lerp over all of them gives, bit for bit, whatever the chunk size."""
    torch.manual_seed(0)
    sizes = [(7, 5), (300,), (13,), (64, 3), (1,)]
    params = {f"p{i}": torch.randn(s) for i, s in enumerate(sizes)}
    start = {k: torch.randn_like(v) for k, v in params.items()}
    expected = {k: v.clone() for k, v in start.items()}
    torch._foreach_lerp_(list(expected.values()), list(params.values()), 0.03)
    for chunk in (1, 40, 350, 10**6):  # one parameter a chunk, several, all in one
        monkeypatch.setattr(ema_module, "CHUNK", chunk)
        shadow = {k: v.clone() for k, v in start.items()}
        ema_module._lerp_from(shadow, params, list(params), 0.03)
        assert all(torch.equal(shadow[k], expected[k]) for k in params), chunk


def test_host_held_ema_every_n_steps_is_the_default_ema_and_resumes_exactly(
    shards: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Six real steps, the EMA updated every 3rd: kept on the host (staged in chunks of a few
    parameters) it equals the default EMA bit for bit; a run resumed from step 3 ends with the
    same EMA and weights as the uninterrupted one; swapping it in and out restores the weights."""
    monkeypatch.setattr(ema_module, "CHUNK", 5000)  # the tiny U-Net's weights in many chunks
    plain = module(None)
    fit(plain, shards, tiny_model, 6, tmp_path / "plain")
    host = module("cpu")
    fit(host, shards, tiny_model, 6, tmp_path / "host")
    assert host.ema.device == torch.device("cpu")
    assert (host.ema.num_updates, host.ema.last_step) == (2, 6)  # steps 3 and 6
    assert plain.ema.shadow.keys() == host.ema.shadow.keys()
    assert all(torch.equal(plain.ema.shadow[k], v) for k, v in host.ema.shadow.items())
    weights = {k: p.detach().clone() for k, p in host.trainable_parameters()}
    assert any(not torch.equal(weights[k], v) for k, v in host.ema.shadow.items())

    resumed = module("cpu")
    fit(
        resumed,
        shards,
        tiny_model,
        6,
        tmp_path / "resumed",
        tmp_path / "host" / "epoch=0-step=3.ckpt",
    )
    assert (resumed.ema.num_updates, resumed.ema.last_step) == (2, 6)
    assert all(torch.equal(resumed.ema.shadow[k], v) for k, v in host.ema.shadow.items())
    assert all(torch.equal(p, weights[k]) for k, p in resumed.trainable_parameters())

    with resumed.ema_weights() as swapped:
        assert swapped
        assert all(torch.equal(p, host.ema.shadow[k]) for k, p in resumed.trainable_parameters())
    assert all(torch.equal(p, weights[k]) for k, p in resumed.trainable_parameters())


def test_the_device_state_counts_no_host_held_ema():
    """perf/state_mem_gb counts what the weights' device holds: parameters, gradients, optimizer
    state, and the EMA only when it is there too (meta stands in for a GPU: sizes, no memory)."""
    params = [torch.nn.Parameter(torch.empty(1000, device="meta")) for _ in range(3)]
    for p in params:
        p.grad = torch.empty_like(p)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    opt = SimpleNamespace(state={p: {"exp_avg": torch.empty_like(p)} for p in params})
    trainer = SimpleNamespace(optimizers=[opt])
    on_device = EMA()
    on_device.shadow = {n: torch.empty(1000, device="meta") for n, _ in named}
    host = EMA(device="cpu")
    host.shadow = {n: torch.zeros(1000) for n, _ in named}
    bytes_of = {
        name: training_state_bytes(
            trainer, SimpleNamespace(trainable_parameters=lambda: named, ema=ema)
        )
        for name, ema in (("device", on_device), ("host", host), ("none", None))
    }
    state = 3 * 1000 * 4 * 3  # weights, gradients, one optimizer state, fp32
    assert bytes_of == {"device": state + 3 * 1000 * 4, "host": state, "none": state}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned host memory")
def test_on_a_gpu_the_host_held_ema_takes_no_gpu_memory_and_matches():
    """A CUDA U-Net: attaching a host-held EMA allocates no GPU memory (the default allocates its
    fp32 shadow there), the shadow is pinned, updates every N steps match the GPU EMA's, and
    swapping it in for sampling puts the raw weights back exactly."""
    parts = build_parts(32, seed=0)
    unet = parts.unet.cuda()
    named = list(unet.named_parameters())
    weights_bytes = sum(p.numel() * 4 for _, p in named)
    gpu, host = EMA(decay=0.9, update_every=2), EMA(decay=0.9, update_every=2, device="cpu")
    before = torch.cuda.memory_allocated()
    host.attach(named)
    assert torch.cuda.memory_allocated() == before
    gpu.attach(named)
    assert torch.cuda.memory_allocated() - before >= weights_bytes
    assert all(v.device.type == "cpu" and v.is_pinned() for v in host.shadow.values())
    torch.manual_seed(1)
    for step in range(1, 7):
        with torch.no_grad():
            for _, p in named:
                p.add_(torch.randn_like(p), alpha=0.01)
        if step % 2 == 0:
            gpu.update(named, step)
            host.update(named, step)
    assert host.num_updates == gpu.num_updates == 3
    for k, v in host.shadow.items():
        torch.testing.assert_close(v, gpu.shadow[k].cpu(), rtol=1e-6, atol=1e-7)
    raw = {k: p.detach().clone() for k, p in named}
    averaged = {k: v.clone() for k, v in host.shadow.items()}
    with host.swapped_in(named):
        assert all(torch.equal(p.cpu(), averaged[k]) for k, p in named)
    assert all(torch.equal(p, raw[k]) for k, p in named)
    assert all(torch.equal(host.shadow[k], v) for k, v in averaged.items())
