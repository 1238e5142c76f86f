"""The checkpoint schema: today's layout pinned, a schema-1 checkpoint (written before the schema
existed) still resumes and exports, and a version from the future is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from sdtrain.artifacts import checkpoint
from sdtrain.cli.export import main as export_main
from sdtrain.cli.train import train
from tests.conftest import ROOT, compose_cfg, tiny_overrides
from tests.test_train import run_with_probe

V1 = ROOT / "tests" / "fixtures" / "checkpoint_v1.ckpt"  # see tests/fixtures/README.md


def test_v1_checkpoint_upgrades():
    raw = torch.load(V1, map_location="cpu", weights_only=True)
    assert "version" not in raw["sdtrain"] and "EMA" in raw["callbacks"]  # really the old layout
    ckpt = checkpoint.load(V1)
    assert ckpt["sdtrain"]["version"] == checkpoint.VERSION
    assert "EMA" not in ckpt["callbacks"]
    run = checkpoint.run_info(ckpt)
    assert set(run) == set(checkpoint.RUN_KEYS)
    assert run["prediction_type"] == "v_prediction" and run["unet_config"]["block_out_channels"]
    ema = checkpoint.ema_state(ckpt)
    assert ema["num_updates"] == 3 and ema["last_step"] == 3
    assert ema["shadow"].keys() == checkpoint.unet_weights(ckpt, ema=False).keys()
    assert checkpoint.skipped_total(ckpt) == 0


def test_v1_checkpoint_exports(tiny_model: Path, tmp_path: Path):
    """The schema-1 file exports with today's code; the U-Net gets its EMA weights."""
    export_main([str(V1), str(tmp_path / "out"), "--pretrained", str(tiny_model)])
    unet = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    shadow = checkpoint.ema_state(checkpoint.load(V1))["shadow"]
    assert unet.keys() == shadow.keys()
    assert all(torch.equal(unet[k], shadow[k]) for k in shadow)


def test_v1_checkpoint_resumes(tiny_model: Path, shards: str, tmp_path: Path):
    """A run resumed from the schema-1 file starts where it stopped, EMA and all, and writes the
    current layout."""
    old = checkpoint.load(V1)
    cfg = compose_cfg(
        tmp_path, tiny_overrides(tiny_model, shards, 4) + ["logger=none", f"ckpt_path={V1}"]
    )
    with open_dict(cfg):  # the fixture's small U-Net
        cfg.model.unet_config = checkpoint.run_info(old)["unet_config"]
    probe = run_with_probe(cfg)
    s = probe.start
    assert (s["step"], s["opt_step"], s["ema_updates"]) == (3, 3, 3)
    saved = checkpoint.ema_state(old)["shadow"]
    assert all(torch.equal(v, saved[k]) for k, v in s["ema_shadow"].items())
    assert all(torch.equal(v, old["state_dict"][f"unet.{k}"]) for k, v in s["unet"].items())
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    pin_current_layout(last)
    assert last["global_step"] == 4 and last["sdtrain"]["ema"]["num_updates"] == 4


def pin_current_layout(ckpt: dict) -> None:
    """What a checkpoint written today holds (a change here is a schema change: bump VERSION)."""
    entry = ckpt["sdtrain"]
    assert entry["version"] == checkpoint.VERSION == 2
    assert set(entry) == {
        "version",
        "run",
        "ema",
        "skipped_total",
        "skipped_nonfinite",
        "skipped_by_kind",
        "drawn_total",
    }
    run_keys = {"pretrained", "unet_config", "prediction_type", "wandb_run_id", "lora"}
    run_keys.add("single_file_config")  # None: a model folder (sdtrain.models.single_file)
    run_keys.add("zero_terminal_snr")  # the tiny model's schedule is rescaled
    run_keys.add("textual_inversion")  # None: no new tokens (sdtrain.models.textual_inversion)
    assert (
        set(entry["run"]) == run_keys and entry["run"]["lora"] is None
    )  # lora: sdtrain.models.lora
    assert entry["run"]["textual_inversion"] is None
    assert set(entry["ema"]) == {"shadow", "num_updates", "last_step", "decay"}
    assert all(k.startswith("unet.") for k in ckpt["state_dict"])
    assert "EMA" not in ckpt["callbacks"]


def test_a_newer_schema_is_refused_by_name(tmp_path: Path, tiny_model: Path, shards: str):
    ckpt = checkpoint.load(V1)
    ckpt["sdtrain"]["version"] = 99
    future = tmp_path / "future.ckpt"
    torch.save(ckpt, future)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"future.ckpt has checkpoint schema version 99"
    ):
        checkpoint.load(future)
    with pytest.raises(SystemExit, match="schema version 99"):
        export_main([str(future), str(tmp_path / "out"), "--pretrained", str(tiny_model)])
    cfg = compose_cfg(
        tmp_path / "run",
        tiny_overrides(tiny_model, shards, 4) + ["logger=none", f"ckpt_path={future}"],
    )
    with pytest.raises(checkpoint.CheckpointError, match="schema version 99"):
        train(cfg)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"state_dict": {}}, "no 'sdtrain' entry"),
        ({"sdtrain": {"version": "2"}}, "not an integer"),
        ([1, 2], "holds list"),
    ],
)
def test_not_an_sdtrain_checkpoint(content, message: str, tmp_path: Path):
    f = tmp_path / "x.ckpt"
    torch.save(content, f)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(f)
