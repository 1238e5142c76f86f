"""A compiled U-Net (`model.compile=unet`, real Inductor) compiles once per process, and a resumed
run compiles it once and never recompiles it: sampling and validation run it eagerly, so their
other batch shapes and eval mode do not add graphs (docs/benchmarks.md, issue 7's target)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(tmp: Path, model: Path, shards: str, steps: int, *extra: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "sdtrain.cli.train",
        f"model.pretrained={model}",
        f"data.train_shards='{shards}'",
        f"data.val_shards='{shards}'",
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.accelerator=cpu",
        f"trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "model.compile=unet",
        "callbacks.sample_images.num_inference_steps=2",
        "callbacks.sample_images.every_n_steps=3",
        "callbacks.val_loss.every_n_steps=3",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        f"hydra.run.dir={tmp / 'run'}",
        *extra,
    ]
    env = {
        **os.environ,
        "TORCH_LOGS": "recompiles,guards",  # a GUARDS block for each compiled frame
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
    }
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


@pytest.mark.slow  # the first run's Inductor build takes about 2 minutes on a 2-core CPU
def test_a_resumed_compiled_run_compiles_once_and_never_recompiles(
    tiny_model: Path, shards: str, tmp_path: Path
):
    first = _run(tmp_path, tiny_model, shards, 3)
    assert first.count("[__guards] GUARDS:") == 1 and "Recompiling" not in first
    assert "finished at step 3/3" in first
    assert any((tmp_path / "inductor").iterdir())  # Inductor's kernels, kept for the next run
    resumed = _run(tmp_path, tiny_model, shards, 6, "ckpt_path=last")
    assert "finished at step 6/6" in resumed and "validation at step 6" in resumed
    samples = tmp_path / "run" / "samples"
    assert (samples / "step_0000003.png").is_file() and (samples / "step_0000006.png").is_file()
    assert resumed.count("[__guards] GUARDS:") == 1, "the resumed run compiled more than once"
    assert "Recompiling" not in resumed
