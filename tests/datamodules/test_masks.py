"""Loss masks on the data path (`data.mask`, sdtrain.datamodules.masks): the mask follows its image
through bucket resize, random crop and flip; alpha masks; missing and broken masks skipped by kind;
and a latent cache keeps the latent-grid mask."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sdtrain.artifacts.shards import write_shards
from sdtrain.cli.cache_latents import main as cache_main
from sdtrain.datamodules import batch as B
from sdtrain.datamodules.buckets import BucketTransform
from sdtrain.datamodules.decode import DecodeStage
from sdtrain.datamodules.masks import MaskTransform
from sdtrain.datamodules.transforms import ImageTextTransform
from sdtrain.datamodules.webdataset import WebDataModule

SHAPES = [(48, 24), (24, 48), (40, 40)]  # (w, h): wide, tall, square -> three buckets
BUCKETS = [[40, 24], [32, 32], [24, 40]]  # at 32 px, sides multiples of 8


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pattern(w: int, h: int, seed: int) -> Image.Image:
    """Grey noise: no two crops, nor a crop and its mirror, look alike."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")


def masked_sample(key: str, w: int, h: int, seed: int) -> dict:
    """An image whose content is its mask: RGB = (m, m, m), KEY.mask.png = m."""
    m = pattern(w, h, seed)
    return {"__key__": key, "png": png(m.convert("RGB")), "txt": b"a pattern", "mask.png": png(m)}


def write_shard(path: Path, samples: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def image_is_mask(pixels: torch.Tensor, mask: torch.Tensor) -> None:
    """pixels (3, H, W) in [-1, 1] of an image whose grey content was its mask (1, H, W)."""
    assert mask.shape == (1, *pixels.shape[-2:])
    assert 0.05 < mask.std() and torch.allclose((pixels + 1) / 2, mask.expand_as(pixels), atol=1e-5)


def test_mask_follows_its_image_through_bucket_crop_and_flip():
    inner = BucketTransform(BUCKETS, center_crop=False, random_flip=True)
    inner.with_meta = True  # its crop record kept: to see that crops and flips were drawn
    transform = MaskTransform(inner, "file")
    flips, lefts, tops = set(), set(), set()
    for i, (w, h) in enumerate(SHAPES * 6):
        ex = transform(masked_sample(f"{i:03d}", w, h, seed=i), random.Random(i))
        image_is_mask(ex[B.PIXELS], ex[B.MASK])
        meta = ex["meta"]
        flips.add(meta["flipped"])
        lefts.add(meta["crop_box"][0])
        tops.add(meta["crop_box"][1])
        assert list(ex[B.PIXELS].shape[-2:][::-1]) in BUCKETS
    assert flips == {True, False} and len(lefts) > 1 and len(tops) > 1  # real crops and flips


def test_masks_batch_through_the_datamodule(tmp_path: Path, tiny_model: Path):
    samples = [masked_sample(f"{i:03d}", *SHAPES[i % 3], seed=i) for i in range(12)]
    url = write_shard(tmp_path / "s" / "00000.tar", samples)
    dm = WebDataModule(url, str(tiny_model), resolution=32, batch_size=2, num_workers=0,
                       buckets=BUCKETS, bucket_step=8, random_flip=True, resampled=False,
                       mask="file")  # fmt: skip
    dm.setup("fit")
    shapes = set()
    for batch, _ in zip(dm.train_dataloader(), range(6), strict=False):
        assert batch[B.MASK].shape == (2, 1, *batch[B.PIXELS].shape[-2:])
        for pixels, mask in zip(batch[B.PIXELS], batch[B.MASK], strict=True):
            image_is_mask(pixels, mask)
        shapes.add(tuple(batch[B.PIXELS].shape[-2:]))
    assert len(shapes) == 3
    plain = WebDataModule(url, str(tiny_model), resolution=32, batch_size=2, num_workers=0)
    plain.setup("fit")
    assert B.MASK not in next(iter(plain.train_dataloader()))  # data.mask=null: no mask


def test_alpha_mask_is_the_alpha_channel_and_opaque_images_weigh_fully():
    m = pattern(40, 24, seed=3)
    black = Image.new("RGB", m.size, (0, 0, 0))
    rgba = Image.merge("RGBA", (*black.split(), m))  # composited onto white: 255 - alpha
    transform = MaskTransform(ImageTextTransform(24, False, True), "alpha")
    for seed in range(4):
        ex = transform({"png": png(rgba), "txt": b"x"}, random.Random(seed))
        white_share = (ex[B.PIXELS][0] + 1) / 2  # (255 - a) / 255, resized as the alpha was
        assert ex[B.MASK].std() > 0.05
        assert torch.allclose(1 - white_share, ex[B.MASK][0], atol=2.5 / 255)
    ex = transform({"png": png(m.convert("RGB")), "txt": b"x"}, random.Random(0))
    assert torch.equal(ex[B.MASK], torch.ones(1, 24, 24))


def test_missing_and_broken_masks_are_skipped_by_kind():
    good = masked_sample("good", 32, 32, seed=0)
    no_mask = {k: v for k, v in masked_sample("none", 32, 32, 1).items() if k != "mask.png"}
    wrong_size = masked_sample("size", 32, 32, 2) | {"mask.png": png(pattern(16, 32, 2))}
    broken = masked_sample("broken", 32, 32, 3) | {"mask.png": b"not a png"}
    stage = DecodeStage(MaskTransform(ImageTextTransform(32, True, False), "file"))
    samples = [s | {"__url__": "s.tar"} for s in (no_mask, wrong_size, broken, good)]
    (example,) = list(stage(iter(samples)))
    assert example["key"] == "good"
    assert example["skipped"] == {"no_mask": 1, "bad_mask": 2}
    with pytest.raises(ValueError, match="data.mask='yes'"):
        WebDataModule("unused.tar", "unused", mask="yes")


def test_latent_cache_keeps_the_latent_grid_mask(tmp_path: Path, tiny_model: Path):
    samples = [masked_sample(f"{i:03d}", *SHAPES[i % 3], seed=i) for i in range(6)]
    src = write_shard(tmp_path / "src" / "00000.tar", samples)
    out = tmp_path / "latents"
    cache_main([src, str(out), "--pretrained", str(tiny_model), "--resolution", "32",
                "--num-workers", "0", "--accelerator", "cpu", "--mask", "file"])  # fmt: skip
    info = json.loads((out / "cache.json").read_text())
    assert info["mask"] == "file" and info["files"][B.MASK] == "mask.npy"
    kw = dict(resolution=None, batch_size=6, num_workers=0, resampled=False, shuffle_buffer=1)
    dm = WebDataModule(str(out), str(tiny_model), mask="file", **kw)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    by_key = {s["__key__"]: s for s in samples}
    crop = ImageTextTransform(32, True, False)  # how the cache cut each image: centre, no flip
    for key, mask in zip(batch[B.KEYS], batch[B.MASK], strict=True):
        cut = crop({"png": by_key[key]["png"], "txt": b"x"})[B.PIXELS][0]  # the grey mask
        f = 32 // mask.shape[-1]  # the VAE's downsampling: 2 for the tiny model, 8 for SD
        assert f > 1 and mask.shape == (1, 32 // f, 32 // f)
        blocks = ((cut + 1) / 2).numpy().reshape(32 // f, f, 32 // f, f).mean(axis=(1, 3))
        np.testing.assert_allclose(mask[0].numpy(), blocks, atol=1e-3)  # fp16 storage
    unmasked = WebDataModule(str(out), str(tiny_model), **kw)  # data.mask=null: left unread
    unmasked.setup("fit")
    assert B.MASK not in next(iter(unmasked.train_dataloader()))
    plain = tmp_path / "plain"
    cache_main([src, str(plain), "--pretrained", str(tiny_model), "--resolution", "32",
                "--num-workers", "0", "--accelerator", "cpu"])  # fmt: skip
    with pytest.raises(ValueError, match="holds no masks.*--mask file"):
        WebDataModule(str(plain), str(tiny_model), mask="file", **kw).setup("fit")


def test_sdtrain_shards_packs_masks_beside_their_images(tmp_path: Path):
    src = tmp_path / "images"
    src.mkdir()
    for name in ("a", "b"):
        pattern(24, 16, seed=ord(name)).convert("RGB").save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"image {name}")
    pattern(24, 16, seed=9).save(src / "a.mask.png")  # a's mask; b has none
    left_out: list = []
    (shard,) = write_shards(src, tmp_path / "out", strict=False, left_out=left_out)
    assert left_out == []  # the mask is no uncaptioned image of its own
    samples = {
        s["__key__"].split("_", 1)[1]: s for s in wds.WebDataset(str(shard), shardshuffle=False)
    }
    assert sorted(samples) == ["a", "b"]
    assert samples["a"]["mask.png"] == (src / "a.mask.png").read_bytes()
    assert "mask.png" not in samples["b"]
