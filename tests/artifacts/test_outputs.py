"""Writing an output beside its target and swapping it in: a failure (an exception, Ctrl-C) part
way through leaves the earlier output as it was and nothing half-written behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtrain.artifacts.outputs import check_file, check_folder, new_file, new_folder


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_folder_write_leaves_the_earlier_folder_as_it_was(
    failure: BaseException, tmp_path: Path
):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model_index.json").write_text("the good one")
    with pytest.raises(type(failure)), new_folder(out) as tmp:
        (tmp / "model_index.json").write_text("half of a new one")
        raise failure
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in out.iterdir()] == ["model_index.json"]
    assert (out / "model_index.json").read_text() == "the good one"


def test_a_failed_file_write_leaves_the_earlier_file_as_it_was(tmp_path: Path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the good one")
    with pytest.raises(OSError), new_file(out) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".safetensors"
        tmp.write_bytes(b"half")
        raise OSError("No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert out.read_bytes() == b"the good one"


def test_targets_that_are_not_what_they_should_be_are_named(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(FileExistsError, match="file is a file, not a folder"):
        check_folder(tmp_path / "file", True, ("model_index.json",), "an export")
    with pytest.raises(IsADirectoryError, match="is a folder: name a .safetensors file"):
        check_file(tmp_path / "dir.safetensors", True, ".safetensors")
    with pytest.raises(ValueError, match="name a .safetensors file"):
        check_file(tmp_path / "model.ckpt", False, ".safetensors")
