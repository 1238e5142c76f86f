"""Real short fits of a module on the test shards, on the CPU, resumable bit for bit: data read in
passes (`resampled=False`), a checkpoint every 3 optimizer steps (`epoch=0-step=3.ckpt`, ...)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from sdtrain.datamodules.webdataset import WebDataModule
from tests.conftest import cpu_trainer


def fit(
    m: L.LightningModule,
    shards: str,
    tiny_model: Path,
    steps: int,
    root: Path,
    ckpt: Path | None = None,
    callbacks: list | None = None,
) -> L.Trainer:
    """Train `m` for `steps` optimizer steps (batches of 2 at 32 px), from `ckpt` if given."""
    kw = dict(resolution=32, batch_size=2, num_workers=0, resampled=False)  # resumes exactly
    dm = WebDataModule(shards, str(tiny_model), **kw)
    every = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)
    trainer = cpu_trainer(
        max_steps=steps,
        enable_checkpointing=True,
        callbacks=[every, *(callbacks or [])],
        default_root_dir=root,
    )
    trainer.fit(m, datamodule=dm, ckpt_path=ckpt)
    return trainer
