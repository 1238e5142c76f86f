"""sdtrain-export on a real checkpoint: the model folder's own scheduler, safe loading, never
clobbering, file modes, quiet output."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdtrain.artifacts import checkpoint as checkpoint_module
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


# ---------------------------------------------------------------- never clobber (issue 27 item 4)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path: what a refused export must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line_exit(argv: list[str], *named: str) -> str:
    """sdtrain-export's message for `argv`: one line that names each of `named`."""
    with pytest.raises(SystemExit) as info:
        export_main(argv)
    message = str(info.value.code)
    assert message.startswith("sdtrain-export: ") and "\n" not in message, message
    assert all(n in message for n in named), message
    return message


def test_export_into_a_used_folder_needs_overwrite_and_then_replaces_it_whole(
    checkpoint: Path, tmp_path: Path
):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "model"
    export_main([str(checkpoint), str(out)])
    (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"stale variant")
    earlier = files(out)
    one_line_exit([str(checkpoint), str(out), "--no-ema"], str(out), "--overwrite")
    assert files(out) == earlier  # untouched: the EMA export and the stale file are still there
    export_main([str(checkpoint), str(out), "--no-ema", "--overwrite"])
    assert files(out).keys() == earlier.keys() - {"unet/diffusion_pytorch_model.fp16.safetensors"}
    unet = UNet2DConditionModel.from_pretrained(out / "unet")  # the raw weights, not the EMA's
    raw = checkpoint_module.unet_weights(checkpoint_module.load(checkpoint), ema=False)
    assert all(torch.equal(v, raw[k]) for k, v in unet.state_dict().items())
    StableDiffusionPipeline.from_pretrained(out, safety_checker=None)  # a whole folder
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary sibling left


def test_export_never_mixes_into_a_folder_of_other_files(checkpoint: Path, tmp_path: Path):
    """Refused even with --overwrite: a mistyped OUT (`.`, a run folder) never loses its files."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    for extra in ([], ["--overwrite"], ["--lora"]):
        one_line_exit([str(checkpoint), str(out), *extra], str(out), "--overwrite")
        assert files(out) == {"todo.txt": b"keep me"}
    (tmp_path / "empty").mkdir()  # an empty folder is as good as a new one
    export_main([str(checkpoint), str(tmp_path / "empty")])
    assert (tmp_path / "empty" / "model_index.json").is_file()


def test_single_file_target_is_replaced_only_with_overwrite(checkpoint: Path, tmp_path: Path):
    file = tmp_path / "model.safetensors"
    export_main([str(checkpoint), "--single-file", str(file)])
    earlier = file.read_bytes()
    one_line_exit(
        [str(checkpoint), "--single-file", str(file), "--no-ema"], str(file), "--overwrite"
    )
    # with a folder too, nothing is written: the folder is not made before the file is refused
    one_line_exit([str(checkpoint), str(tmp_path / "m"), "--single-file", str(file)], str(file))
    assert file.read_bytes() == earlier and not (tmp_path / "m").exists()
    export_main([str(checkpoint), "--single-file", str(file), "--no-ema", "--overwrite"])
    assert file.read_bytes() != earlier  # the raw U-Net now
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_exported_files_have_the_modes_of_other_new_files(checkpoint: Path, tmp_path: Path):
    """0644 / 0755 under umask 022, weights included (safetensors alone leaves them 0600)."""
    mask = os.umask(0o022)
    try:
        file = tmp_path / "model.safetensors"
        export_main([str(checkpoint), str(tmp_path / "model"), "--single-file", str(file)])
    finally:
        os.umask(mask)
    paths = [tmp_path / "model", *(tmp_path / "model").rglob("*"), file]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    want = {k: 0o755 if (tmp_path / k).is_dir() else 0o644 for k in modes}
    assert modes == want
    assert "model/unet/diffusion_pytorch_model.safetensors" in modes


# ---------------------------------------------------------------- quiet tools (issue 27 item 5)


def tool(module: str, args: list[str], cwd: Path) -> list[str]:
    """The lines `python -m module args` printed (stdout, then stderr); it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return (proc.stdout + proc.stderr).splitlines()


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_export_prints_only_what_it_wrote_unless_verbose(checkpoint: Path, tmp_path: Path):
    """No transformers/diffusers loading or saving bars, no torchvision notice."""
    args = [str(checkpoint), "model", "--single-file", "model.safetensors"]
    assert tool("sdtrain.cli.export", args, tmp_path) == ["wrote model.safetensors", "wrote model"]
    verbose = "\n".join(tool("sdtrain.cli.export", [*args, "--overwrite", "--verbose"], tmp_path))
    assert "Loading weights" in verbose and "requires torchvision" in verbose
