"""StepCheckpoint: a run that stops between two save steps still leaves its final step."""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.train import train
from tests.conftest import compose_cfg, tiny_overrides


def test_last_checkpoint_is_the_final_step(tiny_model: Path, shards: str, tmp_path: Path):
    # 5 steps, saving every 2: Lightning's ModelCheckpoint alone leaves last.ckpt at step 4
    overrides = tiny_overrides(tiny_model, shards, 5) + [
        "logger=none",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.sample_images.every_n_steps=0",
    ]
    train(compose_cfg(tmp_path, overrides))
    folder = tmp_path / "checkpoints"
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5
    assert sorted(p.name for p in folder.glob("*.ckpt")) == [
        "last.ckpt",
        "step_0000004.ckpt",
        "step_0000005.ckpt",
    ]
