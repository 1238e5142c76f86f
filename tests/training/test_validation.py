"""The deterministic validation loss: held-out split, the same number for the same weights (on 1
or 2 processes), another for other weights, and a trained model ranked above an untrained one."""

from __future__ import annotations

import csv
import logging
import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdtrain.cli.train import train
from sdtrain.datamodules.heldout import INDEX, WEIGHT
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.models.loader import load_parts
from sdtrain.training import validation
from sdtrain.training.module import StableDiffusionModule
from sdtrain.training.validation import (
    VAL_LOSS,
    VAL_LOSS_EMA,
    evaluate,
    optimized_value,
    timestep_grid,
)
from tests.conftest import compose_cfg, tiny_overrides


def datamodule(shards: str, tiny_model: Path, **kw) -> WebDataModule:
    kw = {"resolution": 32, "batch_size": 5, "num_workers": 0, **kw}
    return WebDataModule(shards, str(tiny_model), **kw)


def module(tiny_model: Path) -> StableDiffusionModule:
    parts = load_parts(str(tiny_model))
    return StableDiffusionModule(parts, optimizer=partial(torch.optim.AdamW, lr=1e-3))


def heldout(shards: str, tiny_model: Path, rank: int = 0, world: int = 1):
    dm = datamodule(shards, tiny_model, val_split_shards=1)
    dm.set_rank(rank, world)
    return dm.heldout_dataloader()


def test_split_holds_out_the_last_shards_and_blocks_go_to_ranks(shards: str, tiny_model: Path):
    dm = datamodule(shards, tiny_model, val_split_shards=1)
    assert [Path(u).name for u in dm.urls] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [Path(u).name for u in dm.val_urls] == ["00003.tar"]
    one = [b[INDEX] for b in heldout(shards, tiny_model)]
    assert one == [list(range(i, min(i + 5, 24))) for i in range(0, 24, 5)]  # 24 in blocks of 5
    r0, r1 = (list(heldout(shards, tiny_model, r, 2)) for r in (0, 1))
    assert [b[INDEX] for b in r0] == one[0::2]
    # rank 1 has 2 blocks of 5, rank 0 has 3: rank 1 repeats its last one with weight 0
    assert [b[INDEX] for b in r1] == [*one[1::2], one[3]]
    assert [b[WEIGHT] for b in r1] == [1.0, 1.0, 0.0]
    again = [b["pixels"] for b in heldout(shards, tiny_model)]  # centre crop, no flip: the same
    first = [b["pixels"] for b in heldout(shards, tiny_model)]
    assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


def test_bad_heldout_settings_are_named(shards: str, tiny_model: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="data.val_split_shards=4 holds out every one"):
        datamodule(shards, tiny_model, val_split_shards=4)
    with pytest.raises(FileNotFoundError, match="data.val_shards"):
        datamodule(shards, tiny_model, val_shards=str(tmp_path / "nope.tar"))
    with pytest.raises(ValueError, match="set one of them"):
        datamodule(shards, tiny_model, val_shards=shards, val_split_shards=1)
    with pytest.raises(ValueError, match="callbacks.val_loss.timesteps=0"):
        timestep_grid(1000, 0)
    assert timestep_grid(1000, 4).tolist() == [125, 375, 625, 875]


def test_same_weights_same_loss_other_weights_other_loss(shards: str, tiny_model: Path):
    m = module(tiny_model)
    batches = heldout(shards, tiny_model)
    a = evaluate(m, batches, timesteps=4)
    assert a == evaluate(m, batches, timesteps=4)  # bit for bit
    assert a != evaluate(m, batches, timesteps=4, seed=1)  # the draws matter
    with torch.no_grad():
        next(m.unet.parameters()).add_(0.01)
    b = evaluate(m, batches, timesteps=4)
    assert b != a and abs(b - a) < 0.5 * a  # other weights, still a loss of the same kind


def _rank_loss(rank: int, port: int, shards: str, tiny_model: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:

        def reduce(x: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(x)
            return x

        loss = evaluate(
            module(tiny_model), heldout(shards, tiny_model, rank, 2), timesteps=4, reduce=reduce
        )
        torch.save(loss, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_one_and_two_processes_give_the_same_loss(shards: str, tiny_model: Path, tmp_path: Path):
    torch.manual_seed(0)  # module() loads the saved weights: the same in every process anyway
    one = evaluate(module(tiny_model), heldout(shards, tiny_model), timesteps=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_loss, args=(port, shards, str(tiny_model), tmp_path), nprocs=2)
    two = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert two == [one, one]


def test_training_lowers_the_validation_loss_and_train_returns_its_best(
    shards: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With optimized_metric=val/loss_ema_best, train() returns the lowest val/loss_ema logged,
    not the last. (The last, the default metric, is what each trial of test_sweeps' grid returns.)
    """
    untrained = evaluate(module(tiny_model), heldout(shards, tiny_model), timesteps=4)
    rounds = []
    real = validation.evaluate_weights

    def worse_at_the_end(*args, **kw) -> dict:  # val/loss_ema at step 16 (round 2) rises by 1
        rounds.append(real(*args, **kw))
        return {**rounds[-1], VAL_LOSS_EMA: rounds[-1][VAL_LOSS_EMA] + (len(rounds) == 2)}

    monkeypatch.setattr(validation, "evaluate_weights", worse_at_the_end)  # steps 8 and 16
    steps = 16
    overrides = [
        o for o in tiny_overrides(tiny_model, shards, steps) if not o.startswith("callbacks.")
    ]
    cfg = compose_cfg(
        tmp_path,
        overrides
        + [
            "callbacks=val_loss",  # the validation callback alone
            "callbacks.val_loss.every_n_steps=8",
            "callbacks.val_loss.timesteps=4",
            "data.val_split_shards=1",
            "logger=csv",
            "trainer.log_every_n_steps=4",
            "model.ema.decay=0.9",
            "model.lr_scheduler.num_warmup_steps=2",
            "optimized_metric=val/loss_ema_best",
        ],
    )
    returned = train(cfg)
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get(VAL_LOSS_EMA)]
    assert [int(r["step"]) for r in rows] == [8, 16]
    ema = [float(r[VAL_LOSS_EMA]) for r in rows]
    assert ema[1] == pytest.approx(rounds[1][VAL_LOSS_EMA] + 1.0) and ema[0] < ema[1]
    assert returned == pytest.approx(ema[0], rel=1e-6)  # the lowest, logged at step 8
    assert float(rows[-1][f"{VAL_LOSS_EMA}_best"]) == pytest.approx(ema[0], rel=1e-6)
    trained = float(rows[-1][VAL_LOSS])
    assert trained < untrained and rounds[1][VAL_LOSS_EMA] < untrained, (untrained, rounds)


def test_a_metric_never_logged_is_named(caplog: pytest.LogCaptureFixture):
    metrics = {"train/loss": torch.tensor(0.5)}
    with pytest.raises(
        ValueError, match="optimized_metric=val/loss_ema was never logged .*train/loss"
    ):
        optimized_value(metrics, VAL_LOSS_EMA, sweep=True)
    with caplog.at_level(logging.WARNING):
        assert optimized_value(metrics, VAL_LOSS_EMA, sweep=False) == 0.5
    assert "data.val_shards" in caplog.text


@pytest.mark.slow  # ~40 s on a 2-core CPU: Lightning's DDP in 2 processes
def test_the_callback_under_ddp_scores_the_weights_as_one_process_does(
    shards: str, tiny_model: Path, tmp_path: Path
):
    from tests.test_train import _cli

    keep = [o for o in tiny_overrides(tiny_model, shards, 2) if not o.startswith("callbacks.")]
    args = keep + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=2",
        "callbacks=val_loss",
        "callbacks.val_loss.timesteps=4",
        "data.val_split_shards=1",
        "data.batch_size=5",
        "model.optimizer.lr=0",  # the weights stay as loaded: the in-process value must match
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (metrics,) = (tmp_path / "run").glob("csv/version_*/metrics.csv")
    (row,) = [r for r in csv.DictReader(metrics.open()) if r.get(VAL_LOSS)]
    one = evaluate(module(tiny_model), heldout(shards, tiny_model), timesteps=4)
    assert int(row["step"]) == 2
    assert float(row[VAL_LOSS]) == pytest.approx(one, rel=1e-12)
    assert float(row[VAL_LOSS_EMA]) == pytest.approx(one, rel=1e-5)  # an EMA of equal weights


def test_the_demo_holds_out_shapes_of_its_own(tiny_model: Path, tmp_path: Path):
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from sdtrain.demo import shapes as demo

    cfg = compose_cfg(tmp_path)  # the defaults: the demo
    assert cfg.optimized_metric == VAL_LOSS_EMA and "val_loss" in cfg.callbacks
    urls = datamodule(tiny_model=tiny_model, shards=cfg.data.val_shards).urls  # made on first use
    members = [m for u in urls for m in tarfile.open(u) if m.name.endswith(".png")]
    assert len(members) == 24
    first = tarfile.open(urls[0])
    png = sorted(n for n in first.getnames() if n.endswith(".png"))[0]
    val0 = np.asarray(Image.open(io.BytesIO(first.extractfile(png).read())))
    train0 = np.asarray(next(demo.samples(1, 32, seed=0))[0])  # the training set's first image
    assert val0.shape == train0.shape and not np.array_equal(val0, train0)


def test_a_round_encodes_each_held_out_image_once_for_raw_and_ema(shards: str, tiny_model: Path):
    """Raw and EMA weights score the same VAE latents: one encode per batch a round (two on the
    code before), and each value equals its weights evaluated alone (issue 26 item 8)."""
    from sdtrain.training.ema import EMA

    m = module(tiny_model)
    m.ema = EMA(decay=0.5, warmup=False)
    m.ema.attach(m.trainable_parameters())
    with torch.no_grad():
        for _, p in m.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))  # raw weights move; the shadow stays
    batches = list(heldout(shards, tiny_model))
    raw = evaluate(m, batches, timesteps=2)
    with m.ema_weights() as present:
        assert present
        ema = evaluate(m, batches, timesteps=2)
    assert raw != ema
    calls = []
    real = m.vae.encode
    m.vae.encode = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    weights = {"raw": validation.current_weights, "ema": m.ema_weights}
    both = validation.evaluate_weights(m, batches, weights, timesteps=2)
    assert len(calls) == len(batches)
    assert both == {"raw": raw, "ema": ema}  # bit for bit, as each alone
    m.ema = None  # no EMA: that name is left out, as the callback logs no val/loss_ema then
    assert validation.evaluate_weights(m, batches, weights, timesteps=2) == {"raw": raw}
