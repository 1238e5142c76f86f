"""Mistakes stop the run before anything heavy starts, with one line naming the key or file and
what to do: a damaged checkpoint, a file that is no checkpoint, an empty model folder, a
misspelled or added key."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from sdtrain.artifacts import checkpoint
from sdtrain.cli.export import main as export_main
from sdtrain.cli.train import did_you_mean, train
from sdtrain.models.loader import check_model_folder
from sdtrain.models.parts import REQUIRED
from tests.conftest import ROOT, compose_cfg, tiny_overrides
from tests.test_train import _cli

V1 = ROOT / "tests" / "fixtures" / "checkpoint_v1.ckpt"


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list:
    """Records any model build (and fails it): the checks must come before."""
    import sdtrain.cli.train as T

    built: list = []
    monkeypatch.setattr(T, "build_model", lambda cfg: built.append(cfg) or 1 / 0)
    return built


def not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    files = {
        "random": (tmp_path / "random.ckpt", bytes(range(256)) * 8),
        "text": (tmp_path / "notes.txt", b"hello\n"),
        "pickle": (tmp_path / "pickled.ckpt", pickle.dumps({"sdtrain": {}})),
        "truncated": (tmp_path / "truncated.ckpt", V1.read_bytes()[: V1.stat().st_size // 2]),
    }
    for path, content in files.values():
        path.write_bytes(content)
    return {k: p for k, (p, _) in files.items()}


@pytest.mark.parametrize("kind", ["random", "text", "pickle", "truncated"])
def test_a_damaged_ckpt_path_is_named_before_the_model_loads(
    kind: str, tiny_model: Path, shards: str, tmp_path: Path, no_model: list
):
    bad = not_checkpoints(tmp_path)[kind]
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards) + [f"ckpt_path={bad}"])
    with pytest.raises(checkpoint.CheckpointError) as e:
        train(cfg)
    message = str(e.value)
    assert message.startswith(f"ckpt_path: {bad} is not a loadable checkpoint"), message
    assert "sdtrain-train wrote" in message and "mmap" not in message and "\n" not in message
    assert no_model == []


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_export_of_a_non_checkpoint_is_one_clean_line(kind: str, tmp_path: Path):
    bad = not_checkpoints(tmp_path)[kind]
    with pytest.raises(SystemExit) as e:  # a str code: Python prints it, exit status 1
        export_main([str(bad), str(tmp_path / "out")])
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"sdtrain-export: {bad} is not a loadable checkpoint"), message
    assert "sdtrain-train wrote" in message and "mmap" not in message
    assert not (tmp_path / "out").exists()


def test_an_empty_model_folder_names_every_missing_subfolder(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as e:
        check_model_folder(tmp_path)
    message = str(e.value)
    assert f"model.pretrained: {tmp_path} lacks unet/, vae/, text_encoder/" in message
    assert all(f"{p}/" in message for p in REQUIRED) and "sdtrain-tiny-model" in message
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks vae/, text_encoder/, tokenizer/, sch"):
        check_model_folder(tmp_path)


def test_a_config_mistake_is_one_line_without_traceback(tiny_model: Path, shards: str, tmp_path):
    (tmp_path / "empty").mkdir()
    args = tiny_overrides(tiny_model, shards) + [
        f"model.pretrained={tmp_path / 'empty'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = _cli(args, tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("sdtrain-train:")]
    assert line.startswith(f"sdtrain-train: model.pretrained: {tmp_path / 'empty'} lacks unet/")


def test_a_misspelled_key_gets_hydras_error_and_a_suggestion(tmp_path: Path):
    proc = _cli(["trainer.max_step=10", "sed=3", "logger=none"], tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "Could not override 'trainer.max_step'" in proc.stderr  # Hydra's own
    assert "did you mean trainer.max_steps=10? did you mean seed=3?" in proc.stderr


def test_did_you_mean_walks_the_config_keys():
    assert did_you_mean(["trainer.max_step=10"]) == "did you mean trainer.max_steps=10?"
    assert did_you_mean(["trainr=cpu"]) == "did you mean trainer=cpu?"
    assert did_you_mean(["model.optimiser.lr=3e-4"]) == "did you mean model.optimizer.lr=3e-4?"
    # a group choice changes the keys: experiment=pretrain brings model.unet_config
    assert did_you_mean(["experiment=pretrain", "model.unet_confg=x"]) == (
        "did you mean model.unet_config=x?"
    )
    # right keys, added keys, deleted keys and far-off names get no suggestion
    assert did_you_mean(["trainer.max_steps=10", "+trainer.profiler=simple", "~logger"]) is None
    assert did_you_mean(["trainer.zzzzzz=1", "-m", "--cfg", "job"]) is None


def test_an_added_key_the_trainer_does_not_take_is_named(
    tiny_model: Path, shards: str, tmp_path: Path, no_model: list
):
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards) + ["+trainer.max_step=10"])
    with pytest.raises(ValueError) as e:
        train(cfg)
    assert str(e.value) == (
        "trainer.max_step: lightning.pytorch.Trainer takes no argument 'max_step'; "
        "did you mean trainer.max_steps?"
    )
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards) + ["+data.batchsize=2"])
    with pytest.raises(ValueError, match=r"data.batchsize: .*did you mean data.batch_size\?"):
        train(cfg)
    assert no_model == []


def test_own_shards_under_the_demo_data_group_name_data_webdataset(tmp_path: Path, shards: str):
    """data.train_shards alone keeps the demo's data group (32 px, random_flip=true for its
    symmetric shapes, its validation shapes): a glyph set trained so learned mirrored letters
    (docs/parity.md). It stops, naming the fix, before any model loads."""
    from sdtrain.demo.resolvers import check_demo_data

    check_demo_data(compose_cfg(tmp_path, []).data)  # the demo itself
    own = compose_cfg(tmp_path, [f"data.train_shards='{shards}'"])
    with pytest.raises(ValueError, match=r"data.train_shards=.*add data=webdataset"):
        check_demo_data(own.data)
    for fix in ("data=webdataset", "experiment=finetune"):
        check_demo_data(compose_cfg(tmp_path, [fix, f"data.train_shards='{shards}'"]).data)
    with pytest.raises(ValueError, match=r"add data=webdataset"):
        train(compose_cfg(tmp_path, [f"data.train_shards='{shards}'", "model.pretrained=/nowhere"]))


def test_a_target_on_an_old_module_path_names_the_new_one(
    tiny_model: Path, shards: str, tmp_path: Path, no_model: list
):
    old = "sdtrain.models.load_parts"  # model.parts' loader before the packages
    cfg = compose_cfg(
        tmp_path, tiny_overrides(tiny_model, shards) + [f"model.parts._target_={old}"]
    )
    with pytest.raises(ValueError) as e:
        train(cfg)
    assert str(e.value).startswith(
        f"model.parts._target_={old}: cannot import it: {old} moved to "
        "sdtrain.models.loader.load_parts"
    ), e.value
    assert no_model == []


# ------------------------------------------------- issue 27 item 2: GPU settings, buckets, seeds


def test_a_gpu_experiment_without_a_gpu_is_one_line_naming_the_cpu_settings(
    tiny_model: Path, shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The README's fine-tune command on a machine without a GPU (CUDA_VISIBLE_DEVICES= hides any):
    one line naming the fix, before W&B starts. It was Lightning's "No supported gpu backend
    found!" inside a traceback, after the data and the model were built."""
    args = [
        "experiment=finetune",
        f"model.pretrained={tiny_model}",
        f"data.train_shards='{shards}'",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # for the command's process
    proc = _cli(args, tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "gpu backend" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        "sdtrain-train: trainer.accelerator=gpu but torch finds no GPU on this machine: to train "
        "on the CPU add trainer.accelerator=cpu trainer.precision=32-true"
    )
    assert not (tmp_path / "run" / "wandb").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("choice", ["trainer=gpu", "trainer.accelerator=cuda"])
def test_every_gpu_setting_is_refused_before_a_model_loads(
    choice: str, tiny_model: Path, shards: str, tmp_path: Path, no_model: list
):
    base = [o for o in tiny_overrides(tiny_model, shards) if o != "trainer.accelerator=cpu"]
    cfg = compose_cfg(tmp_path, [*base, choice])
    with pytest.raises(ValueError, match=r"add trainer.accelerator=cpu trainer.precision=32-true$"):
        train(cfg)
    assert no_model == []


@pytest.mark.parametrize(
    ("size", "fix"),
    [
        (500, "use data.resolution=512 data.bucket_step=64 (or data.resolution=448)"),
        (460, "use data.resolution=448 data.bucket_step=64 (or data.resolution=512)"),
        (32, "use data.resolution=64 data.bucket_step=64"),
    ],
)
def test_a_resolution_the_bucket_step_does_not_divide_names_the_nearest_pair(
    size: int, fix: str, tiny_model: Path, shards: str, tmp_path: Path, no_model: list
):
    overrides = ["data=webdataset", "data.buckets=auto", f"data.resolution={size}"]
    cfg = compose_cfg(tmp_path, tiny_overrides(tiny_model, shards) + overrides)
    with pytest.raises(ValueError) as e:
        train(cfg)
    assert str(e.value) == (
        f"data.resolution={size} is not a multiple of data.bucket_step=64 (data.buckets=auto "
        f"makes every bucket side a multiple of it): {fix}"
    )
    assert no_model == []


@pytest.mark.parametrize("seed", ["7", "null"])
def test_data_seed_is_set_on_its_own(seed: str, tiny_model: Path, shards: str, tmp_path: Path):
    """data.seed apart from the root seed (which model.seed follows) trains, with a logger: it
    stopped with Lightning's "Error while merging hparams: the keys ['seed'] are present in both
    the LightningModule's and LightningDataModule's hparams but have different values"."""
    import yaml

    overrides = ["logger=csv", "~callbacks.sample_images", f"data.seed={seed}"]
    train(compose_cfg(tmp_path, tiny_overrides(tiny_model, shards, 1) + overrides))
    (hparams,) = (tmp_path / "csv").glob("version_*/hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())  # the composed config, whole
    assert logged["data"]["seed"] == yaml.safe_load(seed) and logged["model"]["seed"] == 42
    assert checkpoint.load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 1
