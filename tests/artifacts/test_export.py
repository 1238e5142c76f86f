"""sdtrain-export on a real checkpoint: the model folder's own scheduler, safe loading."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sdtrain.cli.export import main as export_main
from sdtrain.cli.train import train
from tests.conftest import compose_cfg, tiny_overrides


@pytest.fixture(scope="module")
def checkpoint(tiny_model: Path, shards: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-run")
    train(compose_cfg(out, tiny_overrides(tiny_model, shards, 2) + ["logger=none"]))
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("kind", ["PNDMScheduler", "EulerDiscreteScheduler"])
def test_export_keeps_the_model_folders_scheduler(
    kind: str, checkpoint: Path, tiny_model: Path, tmp_path: Path
):
    import diffusers

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    source = getattr(diffusers, kind).from_config(json.loads(cfg_file.read_text()))
    source.save_pretrained(folder / "scheduler")  # the folder now holds a PNDM / Euler scheduler
    export_main([str(checkpoint), str(tmp_path / "out"), "--pretrained", str(folder)])
    written = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    # The tiny model's schedule is rescaled to zero terminal SNR: a sampler that can draw from it
    # (Euler) is kept; PNDM, which divides by sqrt(alpha_bar) = 0 at the last step, gives way to
    # DDIM on the same schedule.
    assert written["_class_name"] == ("DDIMScheduler" if kind == "PNDMScheduler" else kind)
    assert written["rescale_betas_zero_snr"] and written["timestep_spacing"] == "trailing"
    assert written["prediction_type"] == "v_prediction"  # what the run trained for
    assert written["beta_schedule"] == source.config.beta_schedule


def test_export_of_a_plain_schedule_keeps_pndm(checkpoint: Path, tiny_model: Path, tmp_path: Path):
    """Without a zero-terminal-SNR rescale the folder's PNDM stays PNDM."""
    import diffusers

    from sdtrain.artifacts.export import sampler_for

    cfg = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    trained = diffusers.DDPMScheduler.from_config(cfg, rescale_betas_zero_snr=False)
    folder = diffusers.PNDMScheduler.from_config(cfg)
    out = sampler_for(folder, trained)
    assert type(out).__name__ == "PNDMScheduler" and out.alphas_cumprod[-1] > 0


class RunsCode:
    """Unpickling this runs code: what a crafted checkpoint can do under weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_export_never_unpickles_code(tmp_path: Path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"sdtrain": {"pretrained": str(tmp_path)}, "x": RunsCode(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(SystemExit, match="evil.ckpt"):
        export_main([str(evil), str(tmp_path / "out")])
    assert not marker.exists()


def test_export_of_a_non_checkpoint_names_the_file(tmp_path: Path):
    junk = tmp_path / "notes.ckpt"
    junk.write_bytes(pickle.dumps("hello") + b"\x00garbage")
    with pytest.raises(SystemExit, match="notes.ckpt"):
        export_main([str(junk), str(tmp_path / "out")])


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_exported_text_encoder_keys_are_the_established_ones(
    flavour: str, checkpoint: Path, tiny_model: Path, tmp_path: Path
):
    """Every key of the folder's text encoder file under `text_model.`, as SD-1.5's and SD-2's own
    folders hold them (read from the file, whatever transformers writes), and the model loads
    from it whole, with the weights it was written from."""
    from safetensors import safe_open
    from transformers import CLIPTextModel

    from sdtrain.artifacts.folder import save_folder
    from sdtrain.demo.tiny_single import build_flavour
    from sdtrain.models.parts import assemble_pipeline

    if flavour == "sd1":  # a real export: the run's folder's text encoder
        export_main([str(checkpoint), str(tmp_path / "out")])
        source = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").state_dict()
    else:  # an SD-2-shaped (OpenCLIP-style) text encoder through the same folder writer
        p = build_flavour("sd2")
        save_folder(
            assemble_pipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, p.noise_scheduler),
            tmp_path / "out",
        )
        source = p.text_encoder.state_dict()
    folder = tmp_path / "out" / "text_encoder"
    (file,) = folder.glob("*.safetensors")
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    model, info = CLIPTextModel.from_pretrained(folder, output_loading_info=True)
    assert keys and all(k.startswith("text_model.") for k in keys), sorted(keys)[:3]
    assert len(keys) == len([k for k in source if not k.endswith("position_ids")])
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, source[name]), name
