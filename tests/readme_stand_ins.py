"""What runs README.md's ```bash blocks here (tests/test_readme.py): a stand-in for each of its
placeholders (the tiny model, the test shards, a real run folder, the servers of remote shards),
the programs a block may run and what is appended to each (two CPU steps of training), and the
shims of the programs this machine lacks (sbatch, srun, wandb)."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests import wandb_shim
from tests.conftest import ROOT


@dataclass
class StandIns:
    model: str  # the tiny model folder
    shard_dir: str  # folder of the 4 test shards
    shard_range: str  # "{00000..00003}"
    run: str  # name of a real run folder under outputs/train/runs/
    sdxl: str = ""  # the tiny SDXL folder (made for the blocks that name SDXL)
    http: str = ""  # a local HTTP server of the test shards (for blocks that name remote shards)
    s3: str = ""  # moto's S3 server's endpoint, the test shards in s3://my-bucket/laion/


# README placeholder (regex) -> its stand-in, applied in this order to every command
STAND_INS: list[tuple[str, Callable[[StandIns], str]]] = [
    (r"/models/sd15", lambda s: s.model),
    (r"/models/sdxl", lambda s: s.sdxl),
    (r"https://data\.example\.com/laion", lambda s: f"{s.http}/ok"),  # Remote shards
    (r"https://minio\.example\.com:\d+", lambda s: s.s3),
    (r"model\.pretrained=\.\.\.", lambda s: f"model.pretrained={s.model}"),
    (r"data\.train_shards=\.\.\.", lambda s: f"data.train_shards={s.shard_dir}/"),
    (r"/data/\w+/\{\d+\.\.\d+\}", lambda s: f"{s.shard_dir}/{s.shard_range}"),
    (r"/data/\w+", lambda s: s.shard_dir),
    (r"<run>", lambda s: s.run),
    (r"/tmp/tiny-sd", lambda s: "tiny-sd"),  # into the test's folder
    (r"trainer\.devices=\d+", lambda s: "trainer.devices=2"),  # 8 GPUs -> 2 CPU processes
    (r"(scripts/torchrun\.sh) \d+", lambda s: r"\1 2"),
    (r"(hydra\.sweeper\.n_trials)=\d+", lambda s: rf"\1={TRIALS}"),
    (r"ENTITY/PROJECT/ID", lambda s: wandb_shim.SWEEP_ID),  # what the shim's `wandb sweep` printed
    (r"(?<=\s)\.\.\.(?=\s|$)", lambda s: ""),  # "and your overrides": the appended ones
]
TRIALS = 3  # an Optuna search's trials
SDXL = re.compile(r"experiment=\w*sdxl|/models/sdxl")  # a command of an SDXL model
REMOTE = re.compile(r"https://data\.example\.com/|s3://")  # a command of remote shards
PLACEHOLDER = re.compile(r"<[\w.-]+>|\.\.\.|…|/models/|/data/")

# Appended to every training: two steps on the CPU at 32 px, a CSV log, a 2-step sampler.
TRAIN_ARGS = [
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "data.batch_size=4",
    "data.resolution=32",
    "data.bucket_step=8",  # buckets=auto at 32 px: 24x40, 32x32, 40x24 (64 px steps fit none)
    "model.compile=null",  # the GPU block's compile: minutes of C++ builds on a CPU
    "model.optimizer.fused=null",
    "trainer.benchmark=false",
    "logger=csv",
    "callbacks.sample_images.num_inference_steps=2",
    "callbacks.sample_images.height=32",
    "callbacks.sample_images.width=32",
]
# Blocks whose trainings keep the DataLoader workers their config starts (experiment=finetune: 8,
# capped to the batches a pass of a small folder makes): a user's first run, as the user runs it.
USER_WORKERS = {"fine-tune-on-your-own-images"}
# program -> what it does (for the checks) ; anything else in a README block fails its test
RUNNERS = {
    "sdtrain-train": "train",
    "scripts/torchrun.sh": "train",
    "sbatch": "train",  # the shim below runs the job script here
    "sdtrain-export": "export",
    "sdtrain-sample": "sample",
    "sdtrain-shards": "shards",
    "sdtrain-tiny-model": "tiny-model",
    "sdtrain-cache-latents": "cache-latents",
    "wandb sweep": "wandb-sweep",  # the shim below keeps the sweep file
    "wandb agent": "train",  # the shim runs one trial of the sweep, our overrides appended
}
APPEND = {
    "train": TRAIN_ARGS,
    "tiny-model": ["--vae-steps", "20"],
    "sample": ["--steps", "2", "--device", "cpu"],
    "cache-latents": ["--resolution", "32", "--accelerator", "cpu", "--num-workers", "0"],
}

# No SLURM here: sbatch runs the job script at once as one node with one task; srun runs its task.
SHIMS = {
    "sbatch": """#!/usr/bin/env bash
while [[ "${1:-}" == -* ]]; do shift; done  # sbatch's own options: --nodes=4, ...
export SLURM_NNODES=1 SLURM_NTASKS_PER_NODE=1 SLURM_JOB_ID=1
exec bash "$@"
""",
    "srun": """#!/usr/bin/env bash
while [[ "${1:-}" == --* ]]; do shift; done  # srun's own options: --kill-on-bad-exit=1, ...
exec "$@"
""",
    "wandb": f"""#!/usr/bin/env bash
exec {shlex.quote(sys.executable)} {shlex.quote(str(ROOT / "tests" / "wandb_shim.py"))} "$@"
""",
}


def substitute(text: str, s: StandIns) -> str:
    for pattern, replacement in STAND_INS:
        text = re.sub(pattern, lambda m, r=replacement: m.expand(r(s)), text)
    return text


def stand_in(command: str, s: StandIns, block_id: str) -> tuple[str, str]:
    """(runnable command, its runner kind), or the test fails naming what has no stand-in."""
    command = substitute(command, s)
    words = shlex.split(command)
    program = " ".join(words[:2]) if " ".join(words[:2]) in RUNNERS else words[0]
    if program not in RUNNERS:
        pytest.fail(f"README block {block_id!r} runs {program!r}: add a stand-in to RUNNERS")
    left = PLACEHOLDER.search(command)
    if left:
        pytest.fail(f"README block {block_id!r}: no stand-in for {left.group(0)!r} in {command}")
    kind = RUNNERS[program]
    extra = list(APPEND.get(kind, []))
    if kind == "train" and block_id in USER_WORKERS:  # the workers a user's run starts
        extra.remove("data.num_workers=0")
    if kind == "train":
        if "model.pretrained=" not in command:  # an SDXL experiment trains the tiny SDXL
            extra.append(f"model.pretrained={s.sdxl if SDXL.search(command) else s.model}")
        named = "data.train_shards=" in command or "data.sources" in command  # or a mixture's
        named = named or "data.dreambooth." in command  # or DreamBooth's sets
        if "data.dreambooth." in command:  # 4 class images in 2 sampler steps, drawn once
            extra += ["data.dreambooth.class_images.num_images=4"]
            extra += ["data.dreambooth.class_images.steps=2"]
        if not named:  # the demo's data group on the test shards:
            extra.append(f"data.train_shards={s.shard_dir}/")  # and held out from them too
            if "data.val_shards=" not in command:  # (the demo's own shapes with your shards stop;
                extra.append(f"data.val_shards={s.shard_dir}/")  # a sweep needs held-out data)
        if "hparams_search=optuna" in command and "hydra.sweeper.n_trials=" not in command:
            extra.append(f"hydra.sweeper.n_trials={TRIALS}")
    return " ".join([command, *map(shlex.quote, extra)]), kind


def shard_stand_ins(shards: str) -> tuple[str, str]:
    folder, name = shards.rsplit("/", 1)
    return folder, name.removesuffix(".tar")
