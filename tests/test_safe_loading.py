"""Nothing sdtrain reads runs code, and no credential is written anywhere: each reading path gets
a planted file that would leave a marker if it ran (issue 9 item 7)."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtrain.artifacts.checkpoint import CheckpointError
from sdtrain.cli.train import train
from tests.conftest import compose_cfg, tiny_overrides
from tests.datamodules.test_webdataset import png, write_tar


class RunsCode:
    """Unpickling this creates `marker` (a folder): the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def planted_checkpoint(tmp_path: Path, marker: Path) -> Path:
    """A real torch.save zip archive holding a code-running object among plausible keys."""
    path = tmp_path / "evil.ckpt"
    torch.save({"sdtrain": {"version": 2}, "state_dict": {}, "x": RunsCode(marker)}, path)
    return path


def test_resume_from_a_planted_checkpoint_runs_no_code(
    tiny_model: Path, shards: str, tmp_path: Path
):
    marker = tmp_path / "code-ran"
    evil = planted_checkpoint(tmp_path, marker)
    cfg = compose_cfg(tmp_path / "run", tiny_overrides(tiny_model, shards) + [f"ckpt_path={evil}"])
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        train(cfg)
    assert not marker.exists()


def test_sample_from_a_planted_checkpoint_runs_no_code(tmp_path: Path):
    from sdtrain.cli.sample import main as sample_main

    marker = tmp_path / "code-ran"
    evil = planted_checkpoint(tmp_path, marker)
    with pytest.raises(SystemExit):
        sample_main([str(evil), "--out", str(tmp_path / "out"), "--prompt", "a red circle"])
    assert not marker.exists()


def test_pickled_shard_members_are_never_unpickled(tiny_model: Path, tmp_path: Path):
    """Samples carrying .pyd/.pth/.pkl/.pickle members beside the image: trained on, members
    ignored, nothing runs."""
    marker = tmp_path / "code-ran"
    evil = pickle.dumps(RunsCode(marker))
    buf = io.BytesIO()
    torch.save(RunsCode(marker), buf)
    sample = {"png": png(32), "txt": b"a red square", "pyd": evil, "pkl": evil, "pickle": evil}
    sample["pth"] = buf.getvalue()
    for name in ("a", "b"):
        write_tar(tmp_path / f"{name}.tar", [sample] * 8)
    overrides = tiny_overrides(tiny_model, str(tmp_path / "*.tar"), 2)
    overrides += ["logger=none", "~callbacks.sample_images", "data.resolution=32"]
    train(compose_cfg(tmp_path / "run", overrides))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not marker.exists()


def test_an_object_array_in_a_latent_cache_is_refused_not_unpickled(tmp_path: Path):
    from sdtrain.datamodules.transforms import SkipSample, load_npy

    marker = tmp_path / "code-ran"
    buf = io.BytesIO()
    np.save(buf, np.array([RunsCode(marker)], dtype=object), allow_pickle=True)
    with pytest.raises((SkipSample, ValueError)):
        load_npy(buf.getvalue())
    assert not marker.exists()


def test_no_credential_in_config_checkpoint_or_logs(
    tiny_model: Path, shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A W&B key in the environment is used to log in, never written: not in the run's Hydra
    config, checkpoints, logs or W&B's offline files."""
    key = "k3y" + "0123456789abcdef" * 2 + "xyz0e"  # 40 characters, like a W&B key
    monkeypatch.setenv("WANDB_API_KEY", key)
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_model, shards, 2) + [
        "logger=wandb",
        "logger.wandb.offline=true",
        "~callbacks.sample_images",
    ]
    train(compose_cfg(run, overrides))
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.suffix == ".wandb" for p in files)
    leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert not leaks, leaks
