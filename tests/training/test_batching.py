"""The global batch: per-device batch, accumulation and lr derived from it, before any model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sdtrain.cli.train import prepare
from sdtrain.training import batching
from sdtrain.training.batching import Batching, split
from tests.conftest import compose_cfg, tiny_overrides
from tests.test_train import _cli

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_NAME")


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch: pytest.MonkeyPatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    "global_size, world, cap, per_device, accumulate",
    [
        (16, 1, 16, 16, 1),
        (16, 2, 16, 8, 1),
        (16, 2, 4, 4, 2),
        (48, 2, 16, 12, 2),  # largest divisor of 24 that fits 16, not 16 itself
        (36, 2, 16, 9, 2),  # 9 of 16: at least half the cap
        (6, 2, 16, 3, 1),  # a small count per process fits one micro-batch: no accumulation
        (14, 2, 1, 1, 7),  # a cap of 1: batch 1 is the only split there is
        (2048, 32, 16, 16, 4),
    ],
)
def test_split(global_size: int, world: int, cap: int, per_device: int, accumulate: int):
    assert split(global_size, world, cap) == Batching(global_size, world, per_device, accumulate)


@pytest.mark.parametrize(
    "global_size, world, nearest",
    [(17, 2, "16 or 18"), (100, 8, "96 or 104"), (3, 4, "e.g. 4$")],
)
def test_indivisible_global_batch_names_the_numbers_and_the_nearest(
    global_size: int, world: int, nearest: str
):
    with pytest.raises(
        ValueError, match=rf"global_batch_size={global_size} .* {world} .*{nearest}"
    ):
        split(global_size, world, 16)


@pytest.mark.parametrize(
    "global_size, world, cap, per_rank, would, below, above",
    [
        (14, 2, 4, 7, "1 per device x 7", "12 (3 per device x 2", "16 (4 per device x 2"),
        (34, 2, 16, 17, "1 per device x 17", "32 (16 per device x 1", "36 (9 per device x 2"),
        (14, 2, 2, 7, "1 per device x 7", "12 (2 per device x 3", "16 (2 per device x 4"),
        (7, 1, 3, 7, "1 per device x 7", "6 (3 per device x 2", "8 (2 per device x 4"),
        # not prime, but its largest divisor within 8 is 2: under half the cap
        (44, 2, 8, 22, "2 per device x 11", "42 (7 per device x 3", "48 (8 per device x 3"),
    ],
)
def test_a_per_process_count_that_splits_badly_is_refused_with_the_nearest_good_sizes(
    global_size: int, world: int, cap: int, per_rank: int, would: str, below: str, above: str
):
    """Never a silent fall-back to 1 (or a few) per device x k accumulation steps: the error names
    data.global_batch_size, the count per process and the nearest sizes below and above that
    give at least half of max_batch_size_per_device per device."""
    with pytest.raises(ValueError) as e:
        split(global_size, world, cap)
    message = str(e.value)
    assert f"data.global_batch_size={global_size} gives {per_rank} samples per process" in message
    assert f"data.max_batch_size_per_device={cap}" in message
    assert f"it would train {would} accumulation steps" in message
    assert f"Use data.global_batch_size={below} accumulation step(s)) or {above}" in message


def test_prepare_refuses_a_prime_count_per_process(tiny_model: Path, shards: str, tmp_path: Path):
    """Global 14 on 2 processes with a cap of 4: 7 per process, prime; refused before any model."""
    overrides = tiny_overrides(tiny_model, shards) + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=2",
        "data.global_batch_size=14",
        "data.max_batch_size_per_device=4",
    ]
    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(ValueError, match=r"global_batch_size=14 gives 7 samples .*=12 .* or 16 "):
        prepare(cfg)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_split_refuses_non_counts(bad):
    with pytest.raises(ValueError, match="must be a whole number >= 1"):
        split(bad, 1, 4)
    with pytest.raises(ValueError, match="max_batch_size_per_device"):
        split(8, 1, bad)


def test_device_count_resolves_like_lightning(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert batching.device_count("auto", "gpu") == 8
    assert batching.device_count(-1, "auto") == 8
    assert batching.device_count("auto", "cpu") == 1
    assert batching.device_count(2, "cpu") == 2
    assert batching.device_count("0,1,3", "gpu") == 3
    assert batching.device_count([0, 1], "gpu") == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert batching.device_count("auto", "auto") == 1


def test_world_size_from_the_launcher_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    trainer = compose_cfg(tmp_path, ["trainer.devices=2", "trainer.num_nodes=3"]).trainer
    assert batching.world_size(trainer) == 6
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun
    assert batching.world_size(trainer) == 4
    monkeypatch.setenv("SLURM_NTASKS", "16")  # srun
    assert batching.world_size(trainer) == 16
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning ignores SLURM then, too
    assert batching.world_size(trainer) == 4


def test_lr_scaling_rules():
    assert batching.scaled_lr(1e-4, 512, None, None) == 1e-4
    assert batching.scaled_lr(1e-4, 512, "linear", 256) == pytest.approx(2e-4)
    assert batching.scaled_lr(1e-4, 512, "sqrt", 256) == pytest.approx(1e-4 * math.sqrt(2))
    with pytest.raises(ValueError, match="model.base_batch_size"):
        batching.scaled_lr(1e-4, 512, "linear", None)
    with pytest.raises(ValueError, match="model.lr_scaling='cubic'"):
        batching.scaled_lr(1e-4, 512, "cubic", 256)


@pytest.mark.parametrize(
    "devices, cap, per_device, accumulate", [(1, 16, 16, 1), (2, 16, 8, 1), (2, 4, 4, 2)]
)
def test_prepare_derives_batch_and_accumulation(
    devices: int,
    cap: int,
    per_device: int,
    accumulate: int,
    tiny_model: Path,
    shards: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    overrides = tiny_overrides(tiny_model, shards) + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        f"trainer.devices={devices}",
        "data.global_batch_size=16",
        f"data.max_batch_size_per_device={cap}",
    ]
    cfg = compose_cfg(tmp_path, overrides)
    with caplog.at_level("INFO", logger="sdtrain.training.batching"):
        prepared = prepare(cfg)
    assert prepared.datamodule.hparams.batch_size == cfg.data.batch_size == per_device
    assert cfg.trainer.accumulate_grad_batches == accumulate
    assert cfg.model.optimizer.lr == 1e-3  # no lr_scaling: as given
    line = f"global batch 16 = {devices} process(es) x {per_device} per device x {accumulate}"
    assert line in caplog.text


def test_prepare_scales_lr_without_a_global_batch(tiny_model: Path, shards: str, tmp_path: Path):
    """lr_scaling alone scales to the batch the config gives: 4 per device x 2 accumulation."""
    overrides = tiny_overrides(tiny_model, shards) + [
        "trainer.accumulate_grad_batches=2",
        "model.lr_scaling=linear",
        "model.base_batch_size=4",
    ]
    cfg = compose_cfg(tmp_path, overrides)
    prepare(cfg)
    assert cfg.data.batch_size == 4 and cfg.trainer.accumulate_grad_batches == 2
    assert cfg.model.optimizer.lr == pytest.approx(2e-3)


@pytest.mark.parametrize("rule, factor", [("linear", 2.0), ("sqrt", math.sqrt(2))])
def test_lr_scaling_scales_an_explicit_text_encoder_lr_too(
    rule: str, factor: float, tiny_model: Path, shards: str, tmp_path: Path, caplog
):
    """Global 8 from a base of 4: model.text_encoder_lr follows the rule as optimizer.lr does."""
    overrides = tiny_overrides(tiny_model, shards) + [
        "data.global_batch_size=8",
        f"model.lr_scaling={rule}",
        "model.base_batch_size=4",
        "model.text_encoder_lr=1e-4",
    ]
    cfg = compose_cfg(tmp_path, overrides)
    with caplog.at_level("INFO", logger="sdtrain.training.batching"):
        batching.apply(cfg)
    assert cfg.model.optimizer.lr == pytest.approx(1e-3 * factor)
    assert cfg.model.text_encoder_lr == pytest.approx(1e-4 * factor)
    assert f"text encoder lr {1e-4 * factor:g}" in caplog.text


def test_a_null_text_encoder_lr_stays_null(tiny_model: Path, shards: str, tmp_path: Path):
    """null: the text encoder takes the optimizer's lr, scaled once, there."""
    overrides = tiny_overrides(tiny_model, shards)
    cfg = compose_cfg(tmp_path, overrides + ["model.lr_scaling=linear", "model.base_batch_size=2"])
    batching.apply(cfg)
    assert cfg.model.text_encoder_lr is None and cfg.model.optimizer.lr == pytest.approx(2e-3)


def test_prepare_refuses_an_indivisible_global_batch(tiny_model: Path, shards: str, tmp_path: Path):
    overrides = tiny_overrides(tiny_model, shards) + ["trainer=ddp", "trainer.devices=2"]
    cfg = compose_cfg(
        tmp_path,
        overrides
        + ["trainer.accelerator=cpu", "trainer.precision=32-true", "data.global_batch_size=15"],
    )
    with pytest.raises(ValueError, match=r"global_batch_size=15 .* 2 process.*14 or 16"):
        prepare(cfg)


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_two_ddp_processes_split_the_global_batch(tiny_model: Path, shards: str, tmp_path: Path):
    """A real 2-process CPU DDP run with global 16: 8 per device, no accumulation, and every
    optimizer step trains 16 samples (the checkpoint's step and samples drawn agree)."""
    args = tiny_overrides(tiny_model, shards, 2) + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=2",
        "data.global_batch_size=16",
        "data.max_batch_size_per_device=16",
        "logger=csv",
        "~callbacks.sample_images",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    line = "global batch 16 = 2 process(es) x 8 per device x 1 accumulation step(s)"
    assert out.count(line) == 1, out[-3000:]  # rank 0 says it
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert last["sdtrain"]["drawn_total"] == 2 * 16  # summed over both ranks
    assert last["datamodule_hyper_parameters"]["batch_size"] == 8
    assert last["datamodule_hyper_parameters"]["global_batch_size"] == 16


def test_a_given_accumulation_is_replaced_with_a_warning(
    tiny_model: Path, shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    overrides = tiny_overrides(tiny_model, shards) + [
        "trainer.accumulate_grad_batches=3",
        "data.global_batch_size=8",
    ]
    cfg = compose_cfg(tmp_path, overrides)
    with caplog.at_level("INFO", logger="sdtrain.training.batching"):
        assert batching.apply(cfg) == Batching(8, 1, 4, 2)
    assert "trainer.accumulate_grad_batches=3 is replaced by 2" in caplog.text
    assert cfg.trainer.accumulate_grad_batches == 2
