"""The training step's numerics and randomness through a real Trainer: fp32 noising under
bf16-mixed, draws that differ by rank and continue across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from sdtrain.cli.train import train
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.models.loader import load_parts
from sdtrain.training.module import StableDiffusionModule
from tests.conftest import compose_cfg, cpu_trainer, tiny_overrides
from tests.training.recording import RecordingModule


def test_bf16_mixed_step_noises_in_fp32(tiny_model: Path, shards: str):
    m = RecordingModule(load_parts(tiny_model), optimizer=torch.optim.AdamW, caption_dropout=0.0)
    m.force_timesteps = torch.arange(4)  # t = 0..3: where bf16 rounds sigma_t to 0
    dm = WebDataModule(shards, str(tiny_model), resolution=32, batch_size=4, num_workers=0)
    trainer = cpu_trainer(precision="bf16-mixed", max_steps=1, enable_model_summary=True)
    trainer.fit(m, datamodule=dm)
    r = m.record
    assert r["latents"].dtype == r["noise"].dtype == r["noisy"].dtype == torch.float32
    a = m.noise_scheduler.alphas_cumprod.double()[:4].view(-1, 1, 1, 1)
    expected = a.sqrt() * r["latents"].double() + (1 - a).sqrt() * r["noise"].double()
    assert torch.allclose(r["noisy"].double(), expected, atol=1e-6, rtol=1e-6)


def read_records(folder: Path) -> dict[int, dict[int, list[int]]]:
    """{rank: {step: timesteps}} from a RecordingModule's files."""
    out: dict[int, dict[int, list[int]]] = {}
    for f in folder.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["rank"], {})[r["step"]] = r["t"]
    return out


def test_resumed_run_continues_the_random_stream(
    tiny_model: Path, shards: str, tmp_path: Path, monkeypatch
):
    base = tiny_overrides(tiny_model, shards, steps=4) + [
        "logger=none",
        "model._target_=tests.training.recording.RecordingModule",
    ]
    full_rec, resumed_rec = tmp_path / "full_rec", tmp_path / "resumed_rec"
    full_rec.mkdir(), resumed_rec.mkdir()
    monkeypatch.setenv("SDTRAIN_RECORD_DIR", str(full_rec))
    train(compose_cfg(tmp_path / "full", base))
    monkeypatch.setenv("SDTRAIN_RECORD_DIR", str(resumed_rec))
    mid = tmp_path / "full" / "checkpoints" / "step_0000002.ckpt"
    train(compose_cfg(tmp_path / "resumed", base + [f"ckpt_path={mid}"]))
    full, resumed = read_records(full_rec)[0], read_records(resumed_rec)[0]
    assert sorted(full) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
    assert resumed[2] == full[2] and resumed[3] == full[3]  # the same stream, continued
    assert resumed[2] not in (full[0], full[1])  # not a replay of the first steps
    assert full[0] != full[1]


def fit_two_steps(m: StableDiffusionModule, tiny_model: Path, shards: str, bar: bool) -> L.Trainer:
    dm = WebDataModule(shards, str(tiny_model), resolution=32, batch_size=4, num_workers=0)
    trainer = cpu_trainer(max_steps=2, enable_progress_bar=bar)
    trainer.fit(m, datamodule=dm)
    return trainer


def test_the_step_reads_no_host_value_it_would_wait_for(tiny_model: Path, shards: str):
    """Two host syncs a GPU step made: the schedule indexed from the scheduler's CPU copy (copied
    to the GPU each step) and the loss as a progress-bar metric (read back with .item() each step,
    even with the bar off). The schedule is now a buffer on the module's device, and the loss goes
    to the bar only when there is one."""
    parts = load_parts(tiny_model)
    m = StableDiffusionModule(parts, optimizer=torch.optim.AdamW, caption_dropout=0.0)
    want = parts.noise_scheduler.alphas_cumprod.float()
    m.to(torch.bfloat16)  # a module-wide cast (bf16-true) leaves the schedule in fp32
    assert torch.equal(m.schedule(torch.device("cpu")), want)
    assert not any("schedule" in k or "alphas" in k for k in m.state_dict())  # checkpoints same
    m.to(torch.float32)
    parts.noise_scheduler.alphas_cumprod = None  # never read now
    trainer = fit_two_steps(m, tiny_model, shards, bar=False)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "train/loss" not in trainer.progress_bar_metrics
    m = StableDiffusionModule(load_parts(tiny_model), optimizer=torch.optim.AdamW)
    assert "train/loss" in fit_two_steps(m, tiny_model, shards, bar=True).progress_bar_metrics
