"""sdtrain-shards: folder of captioned images -> WebDataset shards."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from sdtrain.shards import main


def make_images(folder: Path, n: int, fmt: str = "png") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img.{i}.{fmt}"  # a dot in the stem must not break the sample key
        Image.new("RGB", (20, 10), (i * 20, 0, 0)).save(folder / name)
        names.append(name)
    return names


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_txt_captions_and_shard_size(tmp_path: Path, capsys):
    names = make_images(tmp_path / "src", 5)
    for i, n in enumerate(names):
        (tmp_path / "src" / n).with_suffix(".txt").write_text(f"caption {i}\n")
    main([str(tmp_path / "src"), str(tmp_path / "out"), "--samples-per-shard", "2"])
    tars = sorted((tmp_path / "out").glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = {k: v for t in tars for k, v in read_tar(t).items()}
    assert len(samples) == 5
    assert sorted(s["txt"].decode() for s in samples.values()) == [f"caption {i}" for i in range(5)]
    for s in samples.values():
        assert set(s) == {"png", "txt", "json"}
        assert json.loads(s["json"])["caption"] == s["txt"].decode()
    assert "00000..00002" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_file_captions(tmp_path: Path, kind: str):
    names = make_images(tmp_path / "src", 3, fmt="jpg")
    rows = [{"file_name": n, "text": f"from {kind} {i}"} for i, n in enumerate(names)]
    if kind == "jsonl":
        (tmp_path / "src" / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    else:
        with (tmp_path / "src" / "metadata.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, ["file_name", "text"])
            w.writeheader()
            w.writerows(rows)
    main([str(tmp_path / "src"), str(tmp_path / "out")])
    samples = read_tar(tmp_path / "out" / "00000.tar")
    assert sorted(s["txt"].decode() for s in samples.values()) == [r["text"] for r in rows]
    assert all("jpg" in s for s in samples.values())


def test_missing_caption_names_the_file(tmp_path: Path):
    names = make_images(tmp_path / "src", 2)
    (tmp_path / "src" / names[0]).with_suffix(".txt").write_text("only one")
    with pytest.raises(SystemExit, match=names[1].replace(".", r"\.")):
        main([str(tmp_path / "src"), str(tmp_path / "out")])
    main([str(tmp_path / "src"), str(tmp_path / "out2"), "--allow-missing-captions"])
    samples = read_tar(tmp_path / "out2" / "00000.tar")
    assert sorted("txt" in s for s in samples.values()) == [False, True]


def test_metadata_row_for_missing_file_names_the_line(tmp_path: Path):
    make_images(tmp_path / "src", 1)
    (tmp_path / "src" / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(SystemExit, match=r"metadata.jsonl:1.*gone.png"):
        main([str(tmp_path / "src"), str(tmp_path / "out")])


def test_refuses_to_mix_with_existing_shards(tmp_path: Path):
    names = make_images(tmp_path / "src", 1)
    (tmp_path / "src" / names[0]).with_suffix(".txt").write_text("x")
    main([str(tmp_path / "src"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="already holds"):
        main([str(tmp_path / "src"), str(tmp_path / "out")])
