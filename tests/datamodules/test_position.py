"""The data-position table (datamodules/position.py) is shared over ranks once per optimizer step,
and not at all where a resume would not use it (resampled shards): issue 26 item 8."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtrain.artifacts import checkpoint
from sdtrain.cli.train import train
from sdtrain.datamodules.position import DataPosition
from tests.conftest import compose_cfg, tiny_overrides


@pytest.fixture
def gathers(monkeypatch) -> list[int]:
    """The global step at each `DataPosition.gather` (the all-reduce on several ranks): a spy
    around the real method."""
    calls: list[int] = []
    real = DataPosition.gather

    def spy(self, trainer):
        calls.append(trainer.global_step)
        return real(self, trainer)

    monkeypatch.setattr(DataPosition, "gather", spy)
    return calls


@pytest.mark.parametrize("resampled", [False, True])
def test_position_shared_once_per_optimizer_step_and_never_when_resampled(
    tiny_model: Path, shards: str, tmp_path: Path, gathers: list[int], resampled: bool
):
    """3 steps of 2 micro-batches: before, 6 gathers (one per micro-batch, resampled or not)."""
    steps = 3
    cfg = compose_cfg(
        tmp_path,
        tiny_overrides(tiny_model, shards, steps=steps)
        + [
            "logger=none",
            "trainer.accumulate_grad_batches=2",
            f"data.resampled={str(resampled).lower()}",
            f"callbacks.model_checkpoint.every_n_train_steps={steps}",
        ],
    )
    train(cfg)
    saved = checkpoint.load(Path(tmp_path, "checkpoints", "last.ckpt"))
    position = saved["callbacks"].get("DataPosition", {})  # Lightning drops empty states
    if resampled:
        assert gathers == [] and position == {}
    else:
        assert gathers == [1, 2, 3]  # after each step's last micro-batch
        (row,) = position["ranks"]
        drawn = sum(at[1] for at in row["at"])
        assert drawn == steps * 2 * cfg.data.batch_size  # every micro-batch's samples counted
