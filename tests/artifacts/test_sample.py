"""sdtrain-sample on a real checkpoint of a tiny run and on its export: files, seeds, EMA, errors,
never clobbering, quiet output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrain.cli.export import main as export_main
from sdtrain.cli.sample import main as sample_main
from sdtrain.cli.train import train
from tests.artifacts.test_export import tool
from tests.conftest import compose_cfg, tiny_overrides

FAST = ["--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model: Path, shards: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample-run")
    overrides = [o for o in tiny_overrides(tiny_model, shards, 3) if "sample_images" not in o]
    overrides += ["logger=none", "~callbacks.sample_images"]
    train(compose_cfg(out, overrides + ["model.optimizer.lr=1e-3"]))  # EMA and raw drift apart
    return out / "checkpoints" / "last.ckpt"


def pixels(folder: Path) -> dict[str, np.ndarray]:
    """The single images in `folder` (not the grid), by file name."""
    return {
        p.name: np.asarray(Image.open(p), dtype=np.int16)
        for p in sorted(folder.glob("*_seed*.png"))
    }


def run(model: Path, out: Path, *args: str) -> dict[str, np.ndarray]:
    sample_main([str(model), "--out", str(out), *FAST, *args])
    return pixels(out)


def test_checkpoint_images_per_prompt_and_seed_repeat_and_ema_differs(
    checkpoint: Path, tmp_path: Path
):
    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--seed", "0", "--seed", "7"]
    ema = run(checkpoint, tmp_path / "ema", *args)
    assert list(ema) == [
        "000_a-red-circle_seed0.png",
        "001_a-red-circle_seed7.png",
        "002_a-blue-square_seed0.png",
        "003_a-blue-square_seed7.png",
    ]
    assert all(a.shape == (32, 32, 3) for a in ema.values())  # the model's own size
    again = run(checkpoint, tmp_path / "again", *args)
    assert all(np.array_equal(ema[k], again[k]) for k in ema)  # same seeds, same images
    first, second = ema["000_a-red-circle_seed0.png"], ema["001_a-red-circle_seed7.png"]
    assert not np.array_equal(first, second)  # another seed, another image
    raw = run(checkpoint, tmp_path / "raw", *args, "--no-ema")
    assert all(not np.array_equal(ema[k], raw[k]) for k in ema)  # EMA weights are not the raw
    grid = Image.open(tmp_path / "ema" / "grid.png")
    assert grid.width >= 2 * 128 and grid.height >= 2 * 128  # 2x2 tiles upscaled to >= 128 px
    record = json.loads((tmp_path / "ema" / "samples.json").read_text())
    assert [i["seed"] for i in record["images"]] == [0, 7, 0, 7]
    assert "EMA" in record["label"]


def test_export_folder_gives_the_checkpoints_ema_images(checkpoint: Path, tmp_path: Path):
    export_main([str(checkpoint), str(tmp_path / "export")])
    args = ["--prompt", "a green triangle", "--sampler", "euler", "--height", "64"]
    from_ckpt = run(checkpoint, tmp_path / "ckpt", *args)
    from_export = run(tmp_path / "export", tmp_path / "exp", *args)
    assert list(from_ckpt) == list(from_export) == ["000_a-green-triangle_seed0.png"]
    a, b = from_ckpt.popitem()[1], from_export.popitem()[1]
    assert a.shape == (64, 32, 3)
    assert np.abs(a - b).max() <= 1  # the same weights and scheduler, up to rounding


def test_prompts_file_one_per_line_after_command_line_prompts(checkpoint: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a yellow circle  \na green square\n")
    got = run(checkpoint, tmp_path / "out", "--prompts-file", str(prompts), "--prompt", "first")
    assert list(got) == [
        "000_first_seed0.png",
        "001_a-red-circle_seed0.png",
        "002_a-yellow-circle_seed0.png",
        "003_a-green-square_seed0.png",
    ]
    record = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [i["prompt"] for i in record["images"]][1:] == [
        "a red circle",
        "a yellow circle",
        "a green square",
    ]


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("missing.ckpt", [], r"missing\.ckpt does not exist"),
        ("folder", [], r"folder is a folder without model_index\.json"),
        ("notes.ckpt", [], r"notes\.ckpt"),
        (
            "missing.ckpt",
            ["--prompts-file", "nope.txt"],
            r"--prompts-file .*nope\.txt is not a file",
        ),
    ],
)
def test_bad_paths_are_one_line_errors(model: str, extra: list[str], message: str, tmp_path: Path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=message) as info:
        sample_main(
            [str(tmp_path / model), "--out", str(tmp_path / "out"), "--prompt", "x"]
            + [str(tmp_path / e) if e.endswith(".txt") else e for e in extra]
        )
    assert str(info.value).startswith("sdtrain-sample: ") and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_no_prompts_is_an_error(checkpoint: Path, tmp_path: Path):
    with pytest.raises(SystemExit, match="no prompts"):
        sample_main([str(checkpoint), "--out", str(tmp_path / "out")])


def test_out_holding_earlier_images_needs_overwrite_and_is_then_replaced_whole(
    checkpoint: Path, tmp_path: Path
):
    """A second run never overwrites images silently, nor leaves the earlier set's other images
    beside its own (the grid and samples.json would not show them)."""
    out = tmp_path / "images"
    first = run(checkpoint, out, "--prompt", "a red circle", "--prompt", "a blue square")
    record = (out / "samples.json").read_text()
    with pytest.raises(SystemExit) as info:
        run(checkpoint, out, "--prompt", "a green triangle")
    message = str(info.value.code)
    assert message.startswith(f"sdtrain-sample: {out} ") and "--overwrite" in message
    assert pixels(out).keys() == first.keys() and (out / "samples.json").read_text() == record
    again = run(checkpoint, out, "--prompt", "a green triangle", "--overwrite")
    assert list(again) == ["000_a-green-triangle_seed0.png"]  # the earlier two are gone
    assert sorted(p.name for p in out.iterdir()) == [*again, "grid.png", "samples.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["images"]  # no temporary sibling left


def test_out_of_other_files_is_refused_even_with_overwrite(checkpoint: Path, tmp_path: Path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"not mine to replace")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match=f"sdtrain-sample: {out} holds other files"):
            run(checkpoint, out, "--prompt", "a red circle", *extra)
        assert [p.name for p in out.iterdir()] == ["holiday.png"]


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_sample_prints_only_what_it_wrote(checkpoint: Path, tmp_path: Path):
    """No loading bars (transformers' and diffusers' pipeline bar) and no torchvision notice,
    from a checkpoint and from an exported folder."""
    export_main([str(checkpoint), str(tmp_path / "export")])
    for model in (checkpoint, tmp_path / "export"):
        out = f"{model.stem}-images"
        args = [str(model), "--out", out, "--prompt", "a red circle", *FAST]
        assert tool("sdtrain.cli.sample", args, tmp_path) == [f"wrote 1 images and {out}/grid.png"]


@pytest.fixture(scope="module")
def sdxl_checkpoint(tiny_sdxl: Path, shards: str, tmp_path_factory) -> Path:
    """Two steps of a tiny SDXL run (its sampling callback draws once, at the end)."""
    out = tmp_path_factory.mktemp("sample-sdxl-run")
    overrides = tiny_overrides(tiny_sdxl, shards, 2) + ["logger=none", "model.optimizer.lr=1e-3"]
    train(compose_cfg(out, overrides))
    assert (out / "samples" / "step_0000002.png").is_file()  # the callback's SDXL pipeline drew
    return out / "checkpoints" / "last.ckpt"


def test_sdxl_checkpoint_and_export_sample_with_the_sdxl_pipeline(
    sdxl_checkpoint: Path, tmp_path: Path
):
    """An SDXL run samples through StableDiffusionXLPipeline (both text encoders, pooled embedding
    and size ids), from its checkpoint and from its export alike."""
    from diffusers import StableDiffusionXLPipeline

    from sdtrain.artifacts.sample import load_pipeline

    export_main([str(sdxl_checkpoint), str(tmp_path / "export")])
    for model in (sdxl_checkpoint, tmp_path / "export"):
        pipe = load_pipeline(model)
        assert isinstance(pipe, StableDiffusionXLPipeline), type(pipe)
        assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--seed", "0", "--seed", "1"]
    from_ckpt = run(sdxl_checkpoint, tmp_path / "ckpt", *args)
    from_export = run(tmp_path / "export", tmp_path / "exp", *args)
    assert list(from_ckpt) == list(from_export) and len(from_ckpt) == 4
    assert all(a.shape == (32, 32, 3) for a in from_ckpt.values())  # the model's own size
    assert all(np.abs(from_ckpt[k] - from_export[k]).max() <= 1 for k in from_ckpt)  # same weights
    assert not np.array_equal(*list(from_ckpt.values())[:2])  # another seed, another image
    assert (tmp_path / "ckpt" / "grid.png").is_file()
