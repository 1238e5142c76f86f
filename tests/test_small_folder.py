"""The README's "Fine-tune on your own images" on a user's first folder, end to end: sdtrain-shards,
then sdtrain-train experiment=finetune with the DataLoader workers a user gets (issue 27 items 1
and 6). The README test runs the block itself (slow); this one checks what every batch held."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sdtrain.callbacks.ledger import read_ledger
from sdtrain.cli.shards import main as shards_main
from tests.datamodules.test_buckets import noise_image
from tests.datamodules.test_small_sets import FOLDERS, image_of, write_folder

# experiment=finetune as written but for the size: 32 px buckets, a batch of 4, CPU steps
TINY = [
    "experiment=finetune",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "data.resolution=32",
    "data.bucket_step=8",
    "data.batch_size=4",
    "model.compile=null",
    "model.optimizer.fused=null",
    "trainer.benchmark=false",
    "~callbacks.sample_images",
]


def train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`sdtrain-train args` as a user runs it (one thread a process: 2 shared cores here)."""
    env = dict(os.environ, PWD=str(cwd), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sdtrain.cli.train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_finetune_on_13_images_trains_each_pass_whole(tiny_model: Path, tmp_path: Path):
    """13 images of three shapes (7 wide, 4 square, 2 tall), 8 workers asked for: 4 workers for
    the 4 batches a pass makes, said in one line; each run of 4 steps is one pass holding every
    image, no batch holds one image twice. Before, each worker filled its buckets over passes
    (one image up to 4 times in a batch), and without buckets the run stopped after W&B began."""
    shards = write_folder(tmp_path, FOLDERS[13])
    run = tmp_path / "run"
    args = [*TINY, f"model.pretrained={tiny_model}", f"data.train_shards={shards}/"]
    args += [f"hydra.run.dir={run}", "trainer.max_steps=8", "logger=csv"]
    args += ["callbacks=[default,ledger]"]
    proc = train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = read_ledger(run / "ledger" / "rank0.tsv")
    assert sorted(steps) == list(range(8))
    images = {f"img{i}" for i in range(13)}
    for first in (0, 4):  # two passes of 4 batches
        passed = [[image_of(k) for k in steps[s]] for s in range(first, first + 4)]
        assert set().union(*passed) == images, passed
        assert all(len(keys) == 4 == len(set(keys)) for keys in passed), passed
        assert max(Counter(k for keys in passed for k in keys).values()) == 2  # 3 fills a pass
    said = proc.stdout + proc.stderr
    assert "4 DataLoader worker(s), not data.num_workers=8" in said
    assert "bucket 24x40 holds 2 image(s), fewer than data.batch_size=4" in said


def test_a_folder_without_captions_stops_before_anything_starts(tiny_model: Path, tmp_path):
    """Shards whose images have no caption stop the run at once, naming the shards, before W&B
    (the default logger) starts; it used to train into 1000 empty passes after W&B began."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        noise_image(32, 32, seed=i).save(images / f"img{i}.png")
    shards_main([str(images), str(tmp_path / "shards"), "--allow-missing-captions"])
    run = tmp_path / "run"
    args = [*TINY, f"model.pretrained={tiny_model}", f"data.train_shards={tmp_path}/shards/"]
    proc = train([*args, f"hydra.run.dir={run}", "trainer.max_steps=2"], tmp_path)
    assert proc.returncode != 0
    assert f"{tmp_path}/shards/00000.tar) hold no usable sample" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (run / "wandb").exists()  # W&B never started
