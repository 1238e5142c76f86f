"""trainer=fsdp with 2 real CPU processes (gloo): the U-Net sharded with FSDP2, the EMA kept per
shard, checkpoints gathered into one file that resumes exactly (EMA resharded) and exports to a
diffusers folder."""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.export import main as export_main
from tests.conftest import tiny_overrides
from tests.test_resume_parity import assert_same
from tests.test_train import _cli


def test_fsdp_trains_saves_whole_weights_resumes_exactly_and_exports(
    tiny_model: Path, shards: str, tmp_path: Path
):
    def run(folder: Path, *extra: str) -> None:
        args = tiny_overrides(tiny_model, shards, 4) + [
            "trainer=fsdp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            "data.resampled=false",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            f"hydra.run.dir={folder}",
            *extra,
        ]
        proc = _cli(args, tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    assert "FSDP: U-Net sharded over 2 ranks" in (straight / "train.log").read_text()
    assert (straight / "samples" / "step_0000004.png").is_file()  # sampling ran on both ranks
    step2 = straight / "checkpoints" / "step_0000002.ckpt"
    run(resumed, f"ckpt_path={step2}")

    a, b = (
        torch.load(f / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for f in (straight, resumed)
    )
    assert a["global_step"] == b["global_step"] == 4
    shadow = a["sdtrain"]["ema"]["shadow"]
    weights = {k[len("unet.") :]: v for k, v in a["state_dict"].items()}
    assert shadow.keys() == weights.keys()  # whole tensors, not shards
    assert all(shadow[k].shape == weights[k].shape for k in shadow)
    assert a["sdtrain"]["ema"]["num_updates"] == 4
    assert any(not torch.equal(shadow[k], weights[k]) for k in shadow)
    for key in ("state_dict", "sdtrain"):  # resumed from step 2: the same weights and EMA
        assert_same(a[key], b[key], key)

    export_main([str(straight / "checkpoints" / "last.ckpt"), str(tmp_path / "export")])
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet")
    assert torch.equal(unet.state_dict()["conv_in.weight"], shadow["conv_in.weight"])
