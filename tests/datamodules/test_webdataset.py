"""The datamodule on real shards: sdtrain-shards output, img2dataset's layout, broken samples."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from sdtrain.datamodules.webdataset import WebDataModule, expand_shards
from sdtrain.demo import shapes as demo
from tests.conftest import cpu_trainer


def batches(dm: WebDataModule, n: int) -> list[dict]:
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def colour_of(pixels: torch.Tensor) -> str:
    """Palette name of a (3, H, W) tensor in [-1, 1]."""
    arr = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return demo.dominant_colour(arr)


def test_reads_sdtrain_shards_with_matching_captions(shards: str, tiny_model: Path):
    dm = WebDataModule(
        shards, str(tiny_model), resolution=32, batch_size=8, num_workers=0, shuffle_buffer=16
    )
    for b in batches(dm, 4):
        assert b["pixels"].shape == (8, 3, 32, 32)
        assert b["pixels"].min() >= -1 and b["pixels"].max() <= 1
        assert b["input_ids"].shape == (8, 77) and b["input_ids"].dtype == torch.long
        assert b["skipped"] == 0
        for px, cap in zip(b["pixels"], b["captions"], strict=True):
            assert colour_of(px) == cap.split()[1], cap  # image and caption stay together
        decoded = dm.tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)
        assert [d.strip() for d in decoded] == b["captions"]


def test_resize_and_crop_to_resolution(shards: str, tiny_model: Path):
    dm = WebDataModule(
        shards,
        str(tiny_model),
        resolution=16,
        center_crop=True,
        random_flip=False,
        batch_size=4,
        num_workers=0,
    )
    assert batches(dm, 1)[0]["pixels"].shape == (4, 3, 16, 16)


def _jpeg(colour: str, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, demo.COLOURS[colour]).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shard(path: Path, broken: bool = False) -> None:
    """What img2dataset writes: KEY.jpg, KEY.txt, KEY.json (caption, url, sizes, status)."""
    with tarfile.open(path, "w") as tar:
        for i, colour in enumerate(["red", "green", "blue", "yellow"] * 2):
            key = f"{path.stem}{i:04d}"
            meta = {
                "url": f"http://example.invalid/{key}.jpg",
                "caption": f"a {colour} thing",
                "key": key,
                "status": "success",
                "width": 40,
                "height": 30,
            }
            _add(tar, f"{key}.jpg", _jpeg(colour))
            if i % 2:  # half carry the caption in .txt too; the others only in .json
                _add(tar, f"{key}.txt", meta["caption"].encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
        if broken:
            _add(tar, "broken0001.jpg", b"\xff\xd8 not really a jpeg")
            _add(tar, "broken0001.txt", b"a red thing")
            _add(tar, "nocaption0001.jpg", _jpeg("red"))
            _add(tar, "nocaption0001.json", json.dumps({"url": "x", "caption": None}).encode())


def test_reads_img2dataset_layout(tmp_path: Path, tiny_model: Path):
    for n in range(2):
        write_img2dataset_shard(tmp_path / f"{n:05d}.tar")
    dm = WebDataModule(
        str(tmp_path / "{00000..00001}.tar"),
        str(tiny_model),
        resolution=32,
        batch_size=16,
        num_workers=0,
        resampled=False,
        shuffle_buffer=1,
    )
    (b,) = batches(dm, 1)
    assert sorted(b["captions"]) == sorted([f"a {c} thing" for c in demo.COLOURS] * 4)
    for px, cap in zip(b["pixels"], b["captions"], strict=True):
        assert colour_of(px) == cap.split()[1]


def broken_shard_datamodule(tmp_path: Path, tiny_model: Path, batch_size: int) -> WebDataModule:
    """One img2dataset shard with a broken image and an uncaptioned sample, walked in order."""
    write_img2dataset_shard(tmp_path / "00000.tar", broken=True)
    return WebDataModule(
        str(tmp_path / "00000.tar"),
        str(tiny_model),
        resolution=32,
        batch_size=batch_size,
        num_workers=0,
        resampled=False,
        shuffle_buffer=1,
    )


def test_broken_image_and_missing_caption_are_skipped_and_counted(tmp_path: Path, tiny_model: Path):
    dm = broken_shard_datamodule(tmp_path, tiny_model, batch_size=8)
    got = batches(dm, 3)  # the shard repeats: 3 passes' worth of batches
    assert all(len(b["captions"]) == 8 for b in got)
    assert sum(b["skipped"] for b in got) >= 2 * 2  # two bad samples per pass, >= 2 passes seen


def test_one_shard_feeds_more_workers_than_it_has_shards(shards: str, tiny_model: Path):
    """resampled=false with 1 shard and 4 DataLoader workers (a user's first small folder): the
    samples are dealt out, so every worker has data and a pass is every sample once (this used to
    stop: "has 1 shard(s) but 1 rank(s) x 4 worker(s) need at least 4")."""
    first = sorted(Path(shards.split("{")[0]).glob("*.tar"))[0]
    dm = WebDataModule(str(first), str(tiny_model), resolution=16, batch_size=3, num_workers=4,
                       resampled=False, random_flip=False, shuffle_buffer=1)  # fmt: skip
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    keys = [k for _ in range(24 // 3) for k in next(it)["keys"]]  # one pass: 24 samples
    assert len(keys) == len(set(keys)) == 24
    del it


def test_training_runs_on_past_broken_samples_and_logs_the_count(tmp_path: Path, tiny_model: Path):
    from functools import partial

    from sdtrain.models.loader import load_parts
    from sdtrain.training.module import StableDiffusionModule

    dm = broken_shard_datamodule(tmp_path, tiny_model, batch_size=4)
    model = StableDiffusionModule(
        load_parts(tiny_model), optimizer=partial(torch.optim.AdamW, lr=1e-4)
    )
    trainer = cpu_trainer(max_steps=6)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 6
    assert trainer.callback_metrics["data/skipped"] >= 2


def test_split_by_worker_covers_each_sample_once_per_pass(shards: str, tiny_model: Path):
    """resampled=false: 2 DataLoader workers each read their own shards; one pass = every sample."""
    dm = WebDataModule(
        shards,
        str(tiny_model),
        resolution=32,
        batch_size=8,
        num_workers=2,
        resampled=False,
        shuffle_buffer=1,
        random_flip=False,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = []
    for _ in range(96 // 8):  # 4 shards x 24 samples: exactly one pass over the data
        b = next(it)
        seen += [px.sum().item() for px in b["pixels"]]
    assert len(seen) == 96
    assert len(set(round(s, 3) for s in seen)) == 96  # no sample twice: the split is disjoint
    del it, loader


def test_missing_shards_are_named(shards: str, tiny_model: Path):
    pattern = shards.replace("00003}", "00005}")  # two more shards than were written
    with pytest.raises(FileNotFoundError, match=r"2 of 6 shard\(s\).*00004\.tar"):
        WebDataModule(pattern, str(tiny_model))


# data.train_shards forms: folder, glob, brace pattern, list (expand_shards)


def shard_list(urls: str | list[str]) -> list[str]:
    from sdtrain.datamodules.webdataset import expand_shards

    return expand_shards(urls)


def shard_folder(folder: Path, n: int = 4) -> list[str]:
    """`n` (empty) shard files and a stray non-shard; returns the shard paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("not a shard")
    paths = [folder / f"{i:05d}.tar" for i in reversed(range(n))]  # made out of order
    for p in paths:
        p.touch()
    return sorted(map(str, paths))


def test_shards_from_a_folder_are_its_tars_sorted(tmp_path: Path):
    want = shard_folder(tmp_path)
    assert shard_list(str(tmp_path)) == want
    assert shard_list(f"{tmp_path}/") == want


def test_empty_folder_is_named(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("not a shard")
    with pytest.raises(FileNotFoundError) as err:
        shard_list(str(tmp_path))
    assert f"folder {tmp_path} holds no *.tar" in str(err.value)


def test_missing_folder_and_missing_shards_are_named_as_written(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=f"folder {tmp_path}/nope/ does not exist"):
        shard_list(f"{tmp_path}/nope/")
    with pytest.raises(FileNotFoundError, match=r"1 of 1 shard\(s\) do not exist, e.g. ~/nope.tar"):
        shard_list("~/nope.tar")


def test_shards_from_a_glob_sorted(tmp_path: Path):
    want = shard_folder(tmp_path)
    assert shard_list(f"{tmp_path}/*.tar") == want
    assert shard_list(f"{tmp_path}/0000[13].tar") == [want[1], want[3]]


def test_glob_matching_nothing_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar matches no files"):
        shard_list(f"{tmp_path}/nothing-*.tar")


def test_shards_from_a_brace_pattern_and_a_list_of_forms(tmp_path: Path):
    want = shard_folder(tmp_path)
    assert shard_list(f"{tmp_path}/{{00000..00003}}.tar") == want
    mixed = [f"{tmp_path}/{{00002..00003}}.tar", str(tmp_path), f"{tmp_path}/00000.t?r"]
    assert shard_list(mixed) == want[2:] + want + want[:1]


def test_remote_urls_and_pipes_pass_through():
    urls = ["s3://bucket/{00000..00001}.tar", "pipe:curl -s https://host/a/*.tar"]
    assert expand_shards(urls, allow_pipe=True) == [
        "s3://bucket/00000.tar",
        "s3://bucket/00001.tar",
        "pipe:curl -s https://host/a/*.tar",
    ]


def test_pipe_urls_run_only_when_the_config_opts_in(shards: str, tiny_model: Path, tmp_path: Path):
    """A `pipe:` url is a shell command: refused by default (nothing runs), read when allowed."""
    first = expand_shards(shards)[0]
    marker = tmp_path / "ran"
    url = f"pipe:touch {marker}; cat {first}"
    with pytest.raises(ValueError, match=r"data.train_shards: 'pipe:touch .*data.allow_pipe=true"):
        WebDataModule(url, str(tiny_model), resolution=32, batch_size=2, num_workers=0)
    assert not marker.exists()
    dm = WebDataModule(
        url, str(tiny_model), resolution=32, batch_size=2, num_workers=0, allow_pipe=True
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert marker.exists() and len(batch["input_ids"]) == 2


def png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"s{path.stem}{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_skips_are_counted_by_kind(tmp_path: Path, tiny_model: Path):
    """Every kind of unusable sample through the real reader: each skipped, counted as its kind
    (data/skipped/<kind>), and the good samples still come through."""
    good = [{"png": png(16), "txt": b"a red square"} for _ in range(6)]
    write_tar(
        tmp_path / "a.tar",
        good[:3]
        + [
            {"png": b"not an image", "txt": b"broken"},  # decode
            {"png": png(16)},  # no_caption
            {"png": png(16), "txt": b"\xff\xfe caption"},  # bad_caption (not UTF-8)
            {"png": png(40), "txt": b"huge"},  # too_large: 1600 px > max_image_pixels
            {"txt": b"no image here"},  # no_image
        ],
    )
    write_tar(tmp_path / "b.tar", good[3:])
    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = [m for m in tar.getmembers() if m.name.endswith(".png")][-1].offset_data + 20
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:cut])  # cut inside the last image: a truncated tar
    dm = WebDataModule(
        [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")],
        str(tiny_model),
        resolution=16,
        batch_size=4,
        num_workers=0,
        resampled=False,
        shuffle_buffer=1,
        max_image_pixels=1000,
    )
    got = batches(dm, 4)  # >= 2 passes over the 5 good samples
    kinds: dict[str, int] = {}
    for b in got:
        for k, n in b["skipped_kinds"].items():
            kinds[k] = kinds.get(k, 0) + n
    expected = {"decode", "no_caption", "bad_caption", "too_large", "no_image", "bad_shard"}
    assert {k for k, n in kinds.items() if n} == expected, kinds
    assert sum(b["skipped"] for b in got) == sum(kinds.values())
    assert all(c == "a red square" for b in got for c in b["captions"])


def test_bad_limits_are_named(tiny_model: Path, shards: str):
    with pytest.raises(ValueError, match=r"data.max_image_pixels=0"):
        WebDataModule(shards, str(tiny_model), max_image_pixels=0)


class _Constant(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_worker_processes_end_with_the_fit(shards: str, tiny_model: Path):
    """The persistent loader workers stop when fit returns. Inside wds.WebLoader Lightning could
    not see the DataLoader to shut them down: they lived on until garbage collection, which then
    waited 5 s for each (and each trial of an in-process sweep left its own)."""
    import multiprocessing as mp

    before = set(mp.active_children())
    dm = WebDataModule(shards, str(tiny_model), resolution=16, batch_size=8, num_workers=2)
    trainer = cpu_trainer(max_steps=3)
    trainer.fit(_Constant(), datamodule=dm)
    assert trainer.global_step == 3
    assert set(mp.active_children()) - before == set()
