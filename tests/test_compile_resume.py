"""A compiled U-Net (`model.compile=unet`, real Inductor) compiles once per process, and a resumed
run compiles it once and never recompiles it: sampling and validation run it eagerly, so their
other batch shapes and eval mode do not add graphs (docs/benchmarks.md, issue 7's target). The
resumed run starts warm: it reads the first run's kernels from `paths.compile_cache` (issue 29)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(
    tmp: Path, model: Path, shards: str, steps: int, *extra: str, compile: str = "unet"
) -> str:
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
        f"model.compile={compile}",
        "callbacks.sample_images.num_inference_steps=2",
        "callbacks.sample_images.every_n_steps=3",
        "callbacks.val_loss.every_n_steps=3",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        f"hydra.run.dir={tmp / 'run'}",
        f"paths.compile_cache={tmp / 'compile'}",  # the runs share it: the second starts warm
        *extra,
    ]
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
        },
        "TORCH_LOGS": "recompiles,guards",  # a GUARDS block for each compiled frame
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
    assert any((tmp_path / "compile" / "inductor").iterdir())  # kept for the next run
    resumed = _run(tmp_path, tiny_model, shards, 6, "ckpt_path=last")
    # a warm start: the resumed run reads the first run's kernels back from paths.compile_cache
    cold, warm = (first_step_seconds(out) for out in (first, resumed))
    assert warm < cold / 2, (cold, warm)
    assert "finished at step 6/6" in resumed and "validation at step 6" in resumed
    samples = tmp_path / "run" / "samples"
    assert (samples / "step_0000003.png").is_file() and (samples / "step_0000006.png").is_file()
    assert resumed.count("[__guards] GUARDS:") == 1, "the resumed run compiled more than once"
    assert "Recompiling" not in resumed


def first_step_seconds(output: str) -> float:
    """The progress line's `first step done in 1m52s (compile warm-up, ...)`, in seconds."""
    line = next(x for x in output.splitlines() if "first step done in" in x)
    assert "compile warm-up, model.compile=unet" in line, line
    took = line.split("first step done in ")[1].split()[0]
    if took.endswith("s") and "m" not in took:
        return float(took[:-1])
    minutes, seconds = took.rstrip("s").split("m")
    return 60 * int(minutes) + int(seconds)


@pytest.mark.slow  # Inductor builds each layer's forward and backward: about 2 minutes here
def test_repeated_compile_with_checkpointing_channels_last_trains_samples_and_validates(
    tiny_model: Path, shards: str, tmp_path: Path
):
    """compile=repeated with gradient checkpointing and channels-last through sdtrain-train, real
    Inductor: each checkpoint runs inside its compiled layer (speed.checkpoint_inside; a
    checkpoint around a compiled layer failed the compiled backward's stride check on an H100),
    and the run trains, samples and validates under no_grad with those layers."""
    out = _run(
        tmp_path,
        tiny_model,
        shards,
        3,
        "model.gradient_checkpointing=true",
        "model.channels_last=true",
        compile="repeated",
    )
    assert "gradient checkpointing inside" in out and "compiled layers" in out
    assert "finished at step 3/3" in out
