"""A user's first folder under `data.resampled=false` (experiment=finetune): 1, 3 or 13 images of
several shapes, one shard from sdtrain-shards, a batch of 4 and 8 DataLoader workers. Every batch
is full, every pass holds every image, and an image comes twice in a batch only where the folder
holds fewer images than a batch (issue 27 items 1 and 6)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from sdtrain.cli.shards import main as shards_main
from sdtrain.datamodules.buckets import derive_buckets, merge_small_buckets
from sdtrain.datamodules.webdataset import WebDataModule
from tests.datamodules.test_buckets import noise_image

WIDE, SQUARE, TALL = (48, 30), (32, 32), (30, 48)  # at 32 px, step 8: buckets 40x24, 32x32, 24x40
# images -> shapes: 13 holds a bucket (tall) of fewer images than a batch of 4
FOLDERS = {1: [WIDE], 3: [WIDE, SQUARE, TALL], 13: [WIDE] * 7 + [SQUARE] * 4 + [TALL] * 2}
# batches a pass makes (batch 4): without buckets ceil(n / 4); with them, 13 images: tall's 2
# join square (6: 2 batches) beside wide's 7 (2 batches); 3 images: all in one bucket
PER_PASS = {(1, None): 1, (3, None): 1, (13, None): 4, (1, "auto"): 1, (3, "auto"): 1}
PER_PASS[(13, "auto")] = 4


def write_folder(base: Path, shapes: list[tuple[int, int]]) -> Path:
    """Noise images (no two alike) of `shapes` with captions, written to one shard by
    sdtrain-shards with its defaults, as a user would; returns the shard folder."""
    images = base / "images"
    images.mkdir(parents=True)
    for i, (w, h) in enumerate(shapes):
        noise_image(w, h, seed=100 + i).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a photo of thing {i}")
    shards_main([str(images), str(base / "shards")])
    assert len(list((base / "shards").glob("*.tar"))) == 1
    return base / "shards"


def small_set(shards: Path, tiny_model: Path, buckets: str | None, **kw) -> WebDataModule:
    """experiment=finetune's data settings at 32 px: batch 4, 8 workers, passes in order."""
    args = dict(resolution=32, bucket_step=8, buckets=buckets, batch_size=4, num_workers=8)
    args |= dict(resampled=False, shuffle_buffer=500, random_flip=False)
    return WebDataModule(str(shards), str(tiny_model), **(args | kw))


def image_of(key: str) -> str:
    return key.split("_")[-1]  # sdtrain-shards keys: "000000003_img7"


@pytest.mark.parametrize("buckets", [None, "auto"])
@pytest.mark.parametrize("n", [1, 3, 13])
def test_a_first_folder_trains_whole_batches_every_image_each_pass(
    n: int, buckets: str | None, tiny_model: Path, tmp_path: Path, caplog
):
    """Before: without buckets each of the 8 workers held 1-2 samples a pass, never a batch, and
    the loader stopped after 1000 empty passes; with them a worker filled a bucket over passes,
    one image up to 4 times in a batch (3 images of 3 shapes: only ever 4 copies of one)."""
    shards = write_folder(tmp_path, FOLDERS[n])
    per_pass = PER_PASS[(n, buckets)]
    dm = small_set(shards, tiny_model, buckets)
    dm.setup("fit")
    with caplog.at_level(logging.INFO, logger="sdtrain.datamodules"):
        loader = dm.train_dataloader()
    got = list(islice(loader, 2 * per_pass))  # two passes
    images = {f"img{i}" for i in range(n)}
    for p in range(2):
        batches = [[image_of(k) for k in b["keys"]] for b in got[p * per_pass : (p + 1) * per_pass]]
        assert set().union(*batches) == images, batches  # every image, every pass
        for keys in batches:
            assert len(keys) == 4  # whole batches
            # twice in a batch only where the folder holds fewer images than a batch
            assert max(Counter(keys).values()) == math.ceil(4 / min(n, 4)), batches
    assert loader.num_workers == min(8, per_pass)  # a worker for each batch of a pass
    assert f"{per_pass} DataLoader worker(s), not data.num_workers=8" in caplog.text
    del loader


def test_buckets_of_fewer_images_than_a_batch_join_the_nearest(
    tiny_model: Path, tmp_path: Path, caplog
):
    """13 images: wide 7, square 4, tall 2 of a batch of 4. Tall's two train in the square
    bucket (nearer than wide), and the run says so; no batch holds one image twice."""
    buckets = derive_buckets(32, 8)
    assert buckets == [(24, 40), (32, 32), (40, 24)]
    kept, dropped = merge_small_buckets(buckets, FOLDERS[13], batch_size=4)
    assert kept == [(32, 32), (40, 24)] and dropped == {(24, 40): 2}
    # one of each: tall goes first (as far from square as wide; listed first), then wide
    assert merge_small_buckets(buckets, FOLDERS[3], 4) == ([(32, 32)], {(24, 40): 1, (40, 24): 1})
    assert merge_small_buckets(buckets, FOLDERS[3], 1) == (buckets, {})  # a batch of 1: all fill

    shards = write_folder(tmp_path, FOLDERS[13])
    with caplog.at_level(logging.INFO, logger="sdtrain.datamodules"):
        dm = small_set(shards, tiny_model, "auto", num_workers=0)
    assert "bucket 24x40 holds 2 image(s), fewer than data.batch_size=4" in caplog.text
    dm.setup("fit")
    for batch in islice(dm.train_dataloader(), 8):
        keys = [image_of(k) for k in batch["keys"]]
        assert len(set(keys)) == 4, keys
        tall = [k for k in keys if int(k[3:]) >= 11]  # img11, img12: the tall ones
        assert not tall or tuple(batch["pixels"].shape[2:]) == (32, 32)


def test_shards_without_a_usable_sample_are_refused_naming_them(tiny_model: Path, tmp_path):
    """Images written without captions (--allow-missing-captions): the datamodule refuses them
    when built, before a model loads or a logger starts (it used to spin through 1000 empty
    passes inside training first)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        noise_image(32, 32, seed=i).save(images / f"img{i}.png")
    shards_main([str(images), str(tmp_path / "shards"), "--allow-missing-captions"])
    with pytest.raises(ValueError, match=r"shards/00000.tar\) hold no usable sample: an image"):
        small_set(tmp_path / "shards", tiny_model, None)
