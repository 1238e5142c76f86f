"""SDXL's size and crop conditioning from the data (issue 28): every image batch carries each
sample's original size and crop as it was decoded, cropped and flipped, and a latent cache keeps
them (with the pooled text embedding), so a cached SDXL batch trains like its pixel batch."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sdtrain.artifacts.cache import text_encoder_fingerprint
from sdtrain.cli.cache_latents import main as cache_main
from sdtrain.datamodules import batch as B
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.models.loader import load_parts
from sdtrain.models.parts import load_frozen
from sdtrain.models.sdxl import TextEncoderPair
from sdtrain.training.module import StableDiffusionModule
from tests.datamodules.test_latent_cache import loss_of

SIDE = 32  # data.resolution
# stem -> (width, height) as stored; every one crops differently at 32 px (some not at all)
SIZES = {"a": (64, 48), "b": (48, 80), "c": (40, 40), "d": (90, 36), "e": (33, 57), "f": (32, 32)}
ROTATED = "r"  # a JPEG stored 64 x 40 with EXIF Orientation 6: shown (and trained) 40 x 64


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: a crop offset or a flip shows in every one of them."""
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def sized(tmp_path_factory) -> tuple[str, Path]:
    """14 images of seven known sizes (two each) -> two shards by sdtrain-shards; (the shards'
    brace pattern, the image folder)."""
    from sdtrain.cli.shards import main

    base = tmp_path_factory.mktemp("sized")
    images = base / "images"
    images.mkdir()
    for seed, (name, (w, h)) in enumerate(sorted(SIZES.items()) * 2):
        stem = f"{name}{seed // len(SIZES)}"
        noise(w, h, seed).save(images / f"{stem}.png")
        (images / f"{stem}.txt").write_text(f"a photo {stem}")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    for i in range(2):
        noise(64, 40, 100 + i).save(images / f"{ROTATED}{i}.jpg", quality=95, exif=exif)
        (images / f"{ROTATED}{i}.txt").write_text(f"a photo {ROTATED}{i}")
    main([str(images), str(base / "tars"), "--samples-per-shard", "7", "--keep-order"])
    return str(base / "tars" / "{00000..00001}.tar"), images


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    from sdtrain.demo.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", SIDE, vae_steps=0)


def shown(images: Path, key: str) -> Image.Image:
    """The image a sample came from, as a viewer shows it (EXIF orientation applied)."""
    stem = key.split("_", 1)[1]  # sdtrain-shards keys: "000000003_c1"
    path = next(p for p in images.glob(f"{stem}.*") if p.suffix != ".txt")
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def resized(img: Image.Image) -> np.ndarray:
    """The image with its short side resized to SIDE, as (h, w, 3) uint8."""
    scale = SIDE / min(img.size)
    size = (max(SIDE, round(img.width * scale)), max(SIDE, round(img.height * scale)))
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS))


def find_window(pixels: torch.Tensor, img: Image.Image) -> tuple[int, int, bool]:
    """(top, left, flipped): where the (3, SIDE, SIDE) training pixels sit in the resized image,
    or in its mirror image when flipped; found by comparing pixels, the only place they match."""
    want = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    found = []
    for flipped, arr in ((False, resized(img)), (True, resized(img)[:, ::-1])):
        for top in range(arr.shape[0] - SIDE + 1):
            for left in range(arr.shape[1] - SIDE + 1):
                if np.array_equal(arr[top : top + SIDE, left : left + SIDE], want):
                    found.append((top, left, flipped))
    assert len(found) == 1, found
    return found[0]


def one_pass(shards: str | Path, model: Path, **kw) -> dict:
    """The first batch of one pass in file order, all 14 samples (the defaults: centre crop)."""
    kw = {"resolution": SIDE, "center_crop": True, "batch_size": 14, "num_workers": 0} | kw
    dm = WebDataModule(str(shards), str(model), resampled=False, shuffle_buffer=1, **kw)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_square_batches_carry_each_true_original_size_and_crop(sized, tiny_sdxl: Path):
    """Random crop and flip on the square path: each sample's original size is the image's as
    shown, and its crop's (top, left) is where its pixels sit in the resized image, in the
    mirrored one when they were flipped (the left of the crop window after the flip)."""
    shards, images = sized
    batch = one_pass(shards, tiny_sdxl, center_crop=False, random_flip=True)
    assert batch[B.ORIGINAL_SIZE].dtype == batch[B.CROP_TOP_LEFT].dtype == torch.long
    assert batch[B.ORIGINAL_SIZE].shape == batch[B.CROP_TOP_LEFT].shape == (14, 2)
    flips = []
    for key, px, size, crop in zip(
        batch[B.KEYS], batch[B.PIXELS], batch[B.ORIGINAL_SIZE], batch[B.CROP_TOP_LEFT], strict=True
    ):
        img = shown(images, key)
        assert size.tolist() == [img.height, img.width], key
        top, left, flipped = find_window(px, img)
        assert crop.tolist() == [top, left], (key, flipped)
        flips.append((flipped, left))
    stored = Image.open(images / f"{ROTATED}0.jpg")
    assert stored.size == (64, 40) and ImageOps.exif_transpose(stored).size == (40, 64)
    # both kinds drawn, and a flipped crop whose left differs from the unflipped image's
    assert {f for f, _ in flips} == {False, True}
    assert any(
        flipped and left != resized(shown(images, k)).shape[1] - SIDE - left
        for (flipped, left), k in zip(flips, batch[B.KEYS], strict=True)
    )


def test_heldout_batches_carry_them_too(sized, tiny_sdxl: Path):
    shards, images = sized
    dm = WebDataModule(shards, str(tiny_sdxl), resolution=SIDE, batch_size=14, num_workers=0,
                       val_shards=shards)  # fmt: skip
    batch = next(iter(dm.heldout_dataloader()))  # centre crop, never flipped
    for key, size, crop in zip(
        batch[B.KEYS], batch[B.ORIGINAL_SIZE], batch[B.CROP_TOP_LEFT], strict=True
    ):
        img = shown(images, key)
        h, w = resized(img).shape[:2]
        assert size.tolist() == [img.height, img.width]
        assert crop.tolist() == [(h - SIDE) // 2, (w - SIDE) // 2]


@pytest.fixture(scope="module")
def sdxl_cache(sized, tiny_sdxl: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl-latents") / "text"
    cache_main([sized[0], str(out), "--pretrained", str(tiny_sdxl), "--resolution", str(SIDE),
                "--batch-size", "8", "--num-workers", "0", "--accelerator", "cpu",
                "--text"])  # fmt: skip
    return out


def test_sdxl_cache_trains_like_the_pixel_batch(sdxl_cache: Path, sized, tiny_sdxl: Path):
    """A cache made with --text from an SDXL folder keeps both encoders' context, the pooled
    embedding and each sample's size and crop: the step's loss is the pixel batch's."""
    info = json.loads((sdxl_cache / "cache.json").read_text())
    _, pair, _, _ = load_frozen(tiny_sdxl)
    assert isinstance(pair, TextEncoderPair)
    assert info["text_encoder_fingerprint"] == text_encoder_fingerprint(pair)
    assert info["context_shape"] == [77, pair.context_dim]
    assert info["pooled_shape"] == [pair.pooled_dim]
    assert info["files"][B.POOLED] == "pooled.npy"

    cached = one_pass(sdxl_cache, tiny_sdxl, resolution=None)
    pixels = one_pass(sized[0], tiny_sdxl)
    assert B.INPUT_IDS not in cached and B.PIXELS not in cached
    assert cached[B.CONTEXT].shape == (14, 77, pair.context_dim)
    assert cached[B.POOLED].shape == (14, pair.pooled_dim)
    at = [pixels[B.KEYS].index(k) for k in cached[B.KEYS]]
    for key in (B.ORIGINAL_SIZE, B.CROP_TOP_LEFT):
        assert torch.equal(cached[key], pixels[key][at]), key
    assert len({tuple(s) for s in cached[B.ORIGINAL_SIZE].tolist()}) == 7  # seven sizes

    m = StableDiffusionModule(
        load_parts(tiny_sdxl), optimizer=torch.optim.AdamW, caption_dropout=0.0
    )
    m.eval()
    keep = (B.PIXELS, B.INPUT_IDS, B.ORIGINAL_SIZE, B.CROP_TOP_LEFT)
    with torch.no_grad():
        reference = loss_of(m, {k: pixels[k][at] for k in keep})
        image_text = {k: cached[k] for k in (B.LATENT_DIST, B.CONTEXT, B.POOLED)}
        loss = loss_of(m, image_text | {k: cached[k] for k in keep[2:]})
        swapped = {B.ORIGINAL_SIZE: cached[B.ORIGINAL_SIZE].flip(1)}  # (w, h): wrong time_ids
        wrong = loss_of(m, image_text | {k: cached[k] for k in keep[2:]} | swapped)
    rtol = 2**-11  # fp16 storage: the loss averages its rounding away, well within a step
    torch.testing.assert_close(loss, reference, rtol=rtol / 4, atol=0.0)
    assert abs(wrong - reference) > rtol * reference  # the check above would see lost time_ids


def strip_crop_records(src: Path, dst: Path) -> None:
    """A copy of a latent cache whose KEY.json holds no size or crop (a cache made elsewhere, or
    before these were recorded)."""
    shutil.copytree(src, dst)
    for shard in dst.glob("*.tar"):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                if member.name.endswith(".json"):
                    data = json.dumps({"caption": "from elsewhere"}).encode()
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def test_sdxl_refuses_a_cache_without_sizes_saying_what_to_do(
    sdxl_cache: Path, tiny_sdxl: Path, tmp_path: Path
):
    old = tmp_path / "old-cache"
    strip_crop_records(sdxl_cache, old)
    batch = one_pass(old, tiny_sdxl, resolution=None)
    assert B.ORIGINAL_SIZE not in batch and B.CROP_TOP_LEFT not in batch  # nothing made up
    m = StableDiffusionModule(load_parts(tiny_sdxl), optimizer=torch.optim.AdamW)
    m.training_step = lambda *a: pytest.fail("trained on a cache without sizes")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    dm = WebDataModule(str(old), str(tiny_sdxl), resolution=None, batch_size=4, num_workers=0)
    with pytest.raises(ValueError) as refused:
        trainer.fit(m, datamodule=dm)
    message = str(refused.value)
    assert f"latent cache {old} does not record each image's original size and crop" in message
    assert f"sdtrain-cache-latents SRC OUT --pretrained {tiny_sdxl}" in message
