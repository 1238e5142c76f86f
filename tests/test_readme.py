"""The README as written: its commands run, its config keys exist, its shard forms parse.

Every ```bash block of README.md runs through `bash -c` in a fresh folder, as written but for the
stand-ins of tests/readme_stand_ins.py (the tiny model, the test shards, a real run folder, 3
Optuna trials, a `wandb` that runs one sweep trial here) and overrides appended to each training
so it takes two CPU steps. The two set-up blocks that CI runs itself (marked `<!-- ci:demo -->` and
`<!-- ci:test -->`) are left out. A command whose program or placeholder
has no stand-in here fails its test: a new documented command cannot go untested.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from sdtrain.datamodules.webdataset import expand_shards
from sdtrain.demo import shapes as demo
from tests.conftest import CONF, ROOT, compose_cfg
from tests.readme_blocks import (
    BLOCKS,
    CI_BLOCKS,
    CONFIG_ROWS,
    README,
    TO_RUN,
    Block,
    slug,
    table_keys,
    table_rows,
    ticked,
)
from tests.readme_stand_ins import (
    REMOTE,
    SDXL,
    SHIMS,
    TRAIN_ARGS,
    StandIns,
    shard_stand_ins,
    stand_in,
    substitute,
)

# ---------------------------------------------------------------- checks


def expected_runs(args: list[str]) -> int:
    """How many training runs a command starts: 1, the size of its Hydra grid, or its Optuna
    search's trials."""
    grid = [a.split("=", 1)[1] for a in args if re.fullmatch(r"[\w.]+=[^\[\]{}()'\"]*,.*", a)]
    for a in args:
        if a.startswith("hparams_search="):
            sweep = OmegaConf.load(CONF / "hparams_search" / f"{a.split('=', 1)[1]}.yaml")
            if "n_trials" in sweep.hydra.sweeper:  # Optuna: the last n_trials given, or the file's
                given = [a for a in args if a.startswith("hydra.sweeper.n_trials=")]
                return int(given[-1].split("=")[1]) if given else sweep.hydra.sweeper.n_trials
            grid += [str(v) for v in sweep.hydra.sweeper.params.values()]
    return math.prod(len(v.split(",")) for v in grid)


def returned(run: Path) -> float:
    """What train() returned in `run` (a run folder): its last val/loss_ema, from the CSV log."""
    (metrics,) = run.glob("csv/version_*/metrics.csv")
    values = [r["val/loss_ema"] for r in csv.DictReader(metrics.open()) if r.get("val/loss_ema")]
    return float(values[-1])


def check_optuna(runs: list[Path]) -> None:
    """An Optuna search: a folder per trial (0, 1, ...) in one sweep folder, and in it the best
    parameters and value, which is the lowest any trial returned."""
    (sweep,) = {run.parent for run in runs}
    trials = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert trials == [str(i) for i in range(len(runs))], trials
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    params = OmegaConf.load(CONF / "hparams_search" / "optuna.yaml").hydra.sweeper.params
    assert set(results["best_params"]) == set(params)
    assert 1e-5 <= results["best_params"]["model.optimizer.lr"] <= 3e-3  # the log interval's bounds
    assert results["best_value"] == pytest.approx(min(returned(run) for run in runs), rel=1e-6)


def check_wandb_trial(runs: list[Path]) -> None:
    """The agent's trial got each parameter of the sweep as a Hydra override."""
    spec = yaml.safe_load((ROOT / "scripts" / "wandb_sweep.yaml").read_text())
    (run,) = runs
    overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml")
    assert set(spec["parameters"]) <= {o.split("=", 1)[0] for o in overrides}, overrides


def checkpoints(cwd: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in cwd.rglob("last.ckpt")}


def check_output(kind: str, args: list[str], cwd: Path, before: dict[Path, int]) -> None:
    """What each program must have left behind (`before`: the checkpoints before it ran)."""
    positional = [a for a in args[1:] if not a.startswith("-")]
    if kind == "train":
        written = [p for p, t in checkpoints(cwd).items() if before.get(p) != t]
        assert len(written) == expected_runs(args), written
        for ckpt in written:
            assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
        runs = [ckpt.parents[1] for ckpt in written]  # <run>/checkpoints/last.ckpt
        if "hparams_search=optuna" in args:
            check_optuna(runs)
        if args[:2] == ["wandb", "agent"]:
            check_wandb_trial(runs)
    elif kind == "export" and "--embedding" in args:  # one file a token, and their list
        out = cwd / positional[1]
        index = json.loads((out / "embeddings.json").read_text())
        assert index and all((out / entry["file"]).is_file() for entry in index.values())
    elif kind == "export" and "--lora" in args:  # diffusers' file for the types it reads
        out = cwd / positional[1]
        kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
        lycoris = any(".hada_" in k or ".lokr_" in k for k in kohya)  # LoHa, LoKr
        assert (out / "pytorch_lora_weights.safetensors").is_file() != lycoris
    elif kind == "export":
        out = cwd / positional[1]
        assert (out / "model_index.json").is_file()
        assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        if "--single-file" in args:
            assert (cwd / args[args.index("--single-file") + 1]).stat().st_size > 0
    elif kind == "sample":
        out = cwd / args[args.index("--out") + 1]
        prompts, seeds = args.count("--prompt"), max(1, args.count("--seed"))
        assert len(list(out.glob("*_seed*.png"))) == prompts * seeds
        assert (out / "grid.png").is_file()
    elif kind == "shards":
        src, out = cwd / positional[0], cwd / positional[1]
        images = [n for t in out.glob("*.tar") for n in tarfile.open(t).getnames()]
        assert len([n for n in images if n.endswith(".png")]) == len(list(src.glob("*.png")))
    elif kind == "tiny-model":
        assert (cwd / positional[0] / "model_index.json").is_file()
    elif kind == "cache-latents":
        assert (cwd / positional[1] / "cache.json").is_file()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def shims(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shims")
    for name, body in SHIMS.items():
        (folder / name).write_text(body)
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def remote_shard_servers(shards: str, tmp_path: Path):
    """(HTTP server url, S3 endpoint, AWS environment) serving the test shards: the README's
    https://data.example.com/laion/ and s3://my-bucket/laion/ (tests/remote_servers.py)."""
    from tests.remote_servers import HttpServer, S3Server

    folder = Path(shard_stand_ins(shards)[0])
    http, s3 = HttpServer(folder, tmp_path / "http.log"), S3Server()
    try:
        s3.put_shards(folder, "my-bucket", "laion")
        yield http.url, s3.endpoint, s3.env(tmp_path)
    finally:
        http.kill()
        s3.stop()


def make_run(cwd: Path, s: StandIns, env: dict[str, str]) -> str:
    """A real run folder, `outputs/train/runs/<name>` in `cwd`, one step in; returns its name.

    Made where it is used, with the overrides the commands get: Lightning restores its checkpoint
    callback's state, and so writes last.ckpt again rather than last-v1.ckpt, only when the
    folder and the callback's settings are the same.
    """
    name = "2024-01-01_00-00-00"
    args = [f"hydra.run.dir=outputs/train/runs/{name}", *TRAIN_ARGS, "trainer.max_steps=1"]
    args += [f"model.pretrained={s.model}", f"data.train_shards={s.shard_dir}/"]
    args += [f"data.val_shards={s.shard_dir}/"]  # as stand_in() appends
    proc = subprocess.run(
        ["sdtrain-train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return name


# ---------------------------------------------------------------- tests


def test_readme_has_the_ci_blocks_and_commands_to_run():
    assert sorted(b.marker for b in BLOCKS if b.marker in CI_BLOCKS) == sorted(CI_BLOCKS)
    assert len(TO_RUN) >= 8 and all(b.commands for b in TO_RUN)


# Blocks whose programs other default tests already run: slow here, to keep the default suite short
# (CI runs them). Seconds are pytest's on a 2-core CPU.
SLOW_BLOCKS = {
    # 2-process DDP, torchrun and SLURM: test_launchers, test_batching; FSDP: test_fsdp
    "several-gpus-and-nodes",
    "several-gpus-and-nodes-2",
    # ~42 s, 8 trials: Hydra grids in test_sweeps and test_sweep_table, lr_sweep in test_configs
    "sweep-hyperparameters",
    # ~31 s: shards (test_shards), buckets, LoRA, single-file export and sampling each in its own
    # tests (test_buckets, test_lora, test_single_file, test_sample); fine-tune-a-pretrained-model
    "fine-tune-on-your-own-images",
    # ~25 s: the same exports in make-images, test_export and test_single_file
    "export",
    # ~38 s: sdtrain-sample in test_sample, the export in test_export
    "make-images",
    # ~54 s: resumes in test_resume, test_resume_overrides and test_preemption
    "resume",
    "resume-2",
    # ~38 s: Hydra grids in test_sweeps and test_sweep_table
    "sweep-hyperparameters-2",
    "sweep-hyperparameters-3",
    # ~32 s: sdtrain-cache-latents in tests/datamodules/test_latent_cache.py
    "cache-latents",
    "cache-latents-2",
    # ~88 s: the SDXL demo's block (2 steps), its sampling and the tiny SDXL made; the demo trains
    # in full in test_demo (slow), SDXL sampling in test_sample, the tiny SDXL in test_tiny
    "sdxl",
    # ~45 s: both SDXL experiments, export and sampling; the experiments train in
    # tests/test_configs.py::test_sdxl_experiments_train_an_sdxl, export and sampling in test_sample
    "sdxl-2",
    # ~75 s, 3 runs: HTTP and S3 shards from real servers in tests/datamodules/test_remote_shards.py
    "remote-shards",
    # ~49 s: textual inversion's training through the config, data path and --embedding export
    # in tests/models/test_textual_inversion.py
    "textual-inversion",
    # ~110 s, 3 runs and the tiny SDXL: DreamBooth's runs (full, LoRA, SDXL) and the class images
    # drawn once and reused in tests/test_dreambooth.py
    "dreambooth",
    # ~124 s, 3 runs (a busy 2-core CPU): each optimizer and the host-held EMA train, checkpoint
    # and resume in tests/training/test_optimizers.py and test_ema_device.py
    "memory-savers-and-other-optimizers",
    # ~80 s: the cache with --text and the offloaded run; tests/training/test_offload.py trains
    # with offload on a cached set (rounds, samples and validation against a run without)
    "memory-savers-and-other-optimizers-2",
    # ~90 s, 4 commands: masks packed by sdtrain-shards, carried through buckets, crops, flips and
    # the latent cache, and the masked step of SD and SDXL in tests/datamodules/test_masks.py and
    # tests/training/test_masked_loss.py (the config keys there too)
    "masked-loss",
    # ~115 s, 2 runs: the LoRA family's types through experiment=lora, sdtrain-train and
    # sdtrain-export in tests/models/test_lora_family.py
    "fine-tune-a-pretrained-model-3",
}


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, marks=pytest.mark.slow) if b.id in SLOW_BLOCKS else b for b in TO_RUN],
    ids=[b.id for b in TO_RUN],
)
def test_readme_block_runs(
    block: Block,
    tiny_model: Path,
    shards: str,
    shims: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
):
    shard_dir, shard_range = shard_stand_ins(shards)
    s = StandIns(str(tiny_model), shard_dir, shard_range, run="")
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    # a user's first folder: 13 images of three shapes (square 5, wide 4, tall 4)
    demo.write_folder(tmp_path / "my_images", 5, 32)
    for i, (w, h) in enumerate([(48, 24), (24, 48)] * 4):  # "images of any shapes"
        Image.new("RGB", (w, h), (200, 40 + 20 * i, 40)).save(tmp_path / "my_images" / f"s{i}.png")
        (tmp_path / "my_images" / f"s{i}.txt").write_text("a red rectangle")
    if block.id == "masked-loss":  # a mask beside every image: its left half trains
        for img in list((tmp_path / "my_images").glob("*.png")):
            mask = Image.new("L", Image.open(img).size, 0)
            mask.paste(255, (0, 0, mask.width // 2, mask.height))
            mask.save(img.with_name(f"{img.stem}.mask.png"))
    path = os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ["PATH"]])
    # One thread a process: the tiny model gains nothing from more, and on a 2-core machine two
    # threads per process thrash (10x slower) once another process (DDP's second rank) shares it.
    env = dict(os.environ, PATH=path, PWD=str(tmp_path), OMP_NUM_THREADS="1")
    if any("<run>" in c for c in block.commands):
        s.run = make_run(tmp_path, s, env)
    if any(SDXL.search(c) for c in block.commands):
        s.sdxl = str(request.getfixturevalue("tiny_sdxl"))
    if any(REMOTE.search(c) for c in block.commands):  # servers of the shards, credentials in env
        s.http, s.s3, aws = request.getfixturevalue("remote_shard_servers")
        env |= aws
    for readme_command in block.commands:
        command, kind = stand_in(readme_command, s, block.id)
        before = checkpoints(tmp_path)
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        check_output(kind, shlex.split(command), tmp_path, before)


@pytest.mark.parametrize("row", CONFIG_ROWS, ids=[ticked(r[0])[0] for r in CONFIG_ROWS])
def test_config_table_options_exist_and_keys_are_settable(row: list[str], tmp_path: Path):
    group, options, sets = row[0].strip("`"), row[1], row[2]
    for option in ticked(options):
        assert (CONF / group / f"{option}.yaml").is_file(), f"{group}={option}"
    defaults = compose_cfg(tmp_path)
    if group not in defaults:  # experiment, hparams_search, debug: null by default
        assert not ticked(sets), f"{group} has no keys of its own"
        return
    keys = table_keys(sets, OmegaConf.to_container(defaults[group], resolve=False))
    unsettable = []
    for key in keys:  # null: any key in the config takes it; a key that is not there fails
        try:
            cfg = compose_cfg(tmp_path, [f"{group}.{key}=null"])
        except Exception as e:  # Hydra: "Key 'height' is not in struct"
            unsettable.append(f"{group}.{key}: {str(e).splitlines()[0]}")
            continue
        assert OmegaConf.select(cfg, f"{group}.{key}") is None
    assert not unsettable, "\n".join(unsettable)


def test_config_table_names_the_keys():
    """The table parses into keys (a broken parse would let the test above pass on nothing)."""
    rows = {r[0].strip("`"): r for r in CONFIG_ROWS}
    cfg = {"sample_images": {"sampler": "ddim"}, "model_checkpoint": {}}
    assert table_keys(rows["callbacks"][2], cfg)[:3] == [
        "sample_images",
        "sample_images.prompts",
        "sample_images.every_n_steps",
    ]
    assert {"ema", "ema.decay", "ema.warmup"} <= set(table_keys(rows["model"][2], {"ema": {}}))
    assert "sample_images.ddim" not in table_keys(rows["callbacks"][2], cfg)  # a value
    assert "prediction_type" in table_keys(rows["model"][2], {})
    assert "null" not in table_keys(rows["model"][2], {})


SHARD_FORMS = table_rows(README.read_text(), "| form | on the command line |")


@pytest.mark.parametrize("form", SHARD_FORMS, ids=[slug(r[0]) for r in SHARD_FORMS])
def test_train_shards_forms_in_the_readme(form: list[str], shards: str, tmp_path: Path):
    """Each documented form, through bash's quoting, Hydra's parser and expand_shards."""
    (argument,) = ticked(form[1])
    shard_dir, shard_range = shard_stand_ins(shards)
    s = StandIns("", shard_dir, shard_range, run="")
    argument = substitute(argument, s)
    words = subprocess.run(
        ["bash", "-c", f"printf '%s\\0' {argument}"], capture_output=True, text=True, check=True
    ).stdout.split("\0")[:-1]
    assert len(words) == 1, words  # the shell expanded nothing
    cfg = compose_cfg(tmp_path, words)
    got = expand_shards(cfg.data.train_shards)
    assert set(got) == {f"{shard_dir}/{i:05d}.tar" for i in range(4)}, got


def test_brace_override_needs_both_quotes(shards: str, tmp_path: Path):
    """The README's old form, as the shell hands it to Hydra, fails to parse."""
    from hydra.errors import OverrideParseException

    with pytest.raises(OverrideParseException, match="mismatched input '{'"):
        compose_cfg(tmp_path, [f"data.train_shards={shards}"])
    cfg = compose_cfg(tmp_path, [f"data.train_shards='{shards}'"])
    assert len(expand_shards(cfg.data.train_shards)) == 4
