"""sdtrain-shards: folder of captioned images -> WebDataset shards."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from sdtrain.cli.shards import main


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
        main([str(tmp_path / "src"), str(tmp_path / "out"), "--strict"])
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


def test_nested_folders_caption_files_and_original_sizes(tmp_path: Path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (30, 12)).save(src / "top.png")
    (src / "top.txt").write_text("from txt")
    Image.new("RGB", (8, 20)).save(src / "a" / "b" / "deep.jpg")
    (src / "a" / "b" / "deep.caption").write_text("from caption\n")
    turned = Image.new("RGB", (40, 10))
    exif = turned.getexif()
    exif[0x0112] = 6  # rotate 90: a viewer shows it 10 wide, 40 high
    turned.save(src / "a" / "turned.jpg", exif=exif)
    (src / "a" / "turned.txt").write_text("turned")
    main([str(src), str(tmp_path / "out")])
    samples = read_tar(tmp_path / "out" / "00000.tar").values()
    meta = {s["txt"].decode(): json.loads(s["json"]) for s in samples}
    sizes = {cap: (m["width"], m["height"]) for cap, m in meta.items()}
    assert sizes == {"from txt": (30, 12), "from caption": (8, 20), "turned": (10, 40)}


def test_bad_files_are_left_out_and_reported_at_the_end(tmp_path: Path, capsys):
    src = tmp_path / "src"
    names = make_images(src, 9)
    for n in names[:7]:
        (src / n).with_suffix(".txt").write_text("ok")
    (src / names[0]).write_bytes(b"not an image")  # unreadable, captioned
    (src / names[1]).write_bytes((src / names[2]).read_bytes()[:30])  # truncated PNG
    main([str(src), str(tmp_path / "out")])
    out = capsys.readouterr()
    assert "wrote 1 shard(s)" in out.out
    assert "left out 4 file(s) (2 uncaptioned, 2 unreadable)" in out.err
    for n in (names[0], names[1], names[7], names[8]):
        assert str(src / n) in out.err
    samples = read_tar(tmp_path / "out" / "00000.tar").values()
    assert sorted(json.loads(s["json"])["file_name"] for s in samples) == [
        str(src / n) for n in names[2:7]
    ]
    with pytest.raises(
        SystemExit, match=f"{names[0]}.*not a readable image".replace(".", r"\.", 1)
    ):
        main([str(src), str(tmp_path / "strict"), "--strict"])
    assert not list((tmp_path / "strict").glob("*.tar"))


def test_report_names_only_the_first_paths_and_all_bad_is_an_error(tmp_path: Path, capsys):
    src = tmp_path / "src"
    names = make_images(src, 8)  # none captioned
    with pytest.raises(SystemExit, match="no usable images"):
        main([str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "left out 8 file(s) (8 uncaptioned)" in err
    assert sum(str(src / n) in err for n in names) == 5


def written_order(out: Path) -> list[str]:
    """Captions in the order the shards hold them (shard by shard, sample by sample)."""
    order = []
    for t in sorted(out.glob("*.tar")):
        with tarfile.open(t) as tar:
            order += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return order


def test_images_go_in_in_a_seeded_random_order_so_every_shard_mixes_the_folder(tmp_path: Path):
    """A folder sorted by class (class_a/..., class_b/...) must not give one-class shards: a
    streaming loader mixes only a few shards at a time (docs/parity.md, the glyphs task)."""
    for cls in ("a", "b", "c", "d"):
        for n in make_images(tmp_path / "src" / cls, 12):
            (tmp_path / "src" / cls / n).with_suffix(".txt").write_text(f"class {cls}")
    src = str(tmp_path / "src")

    def shards(out: str, *flags: str) -> list[str]:
        main([src, str(tmp_path / out), "--samples-per-shard", "12", *flags])
        return written_order(tmp_path / out)

    mixed, again, other = shards("m"), shards("m2"), shards("s7", "--seed", "7")
    assert mixed == again != other  # the same folder and seed give the same shards
    assert sorted(mixed) == sorted(other) == sorted(f"class {c}" for c in "abcd" for _ in range(12))
    per_shard = [set(mixed[i : i + 12]) for i in range(0, 48, 12)]
    assert all(len(classes) >= 3 for classes in per_shard), per_shard  # each shard a mix
    kept = shards("k", "--keep-order")
    assert kept == sorted(kept)  # sorted path order: one class per shard
    assert [len(set(kept[i : i + 12])) for i in range(0, 48, 12)] == [1, 1, 1, 1]
