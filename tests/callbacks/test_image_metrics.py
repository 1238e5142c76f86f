"""ImageMetrics: held-out reading, FID arithmetic, and real runs logging val/clip_score and val/fid."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from sdtrain.callbacks.image_metrics import (
    ImageMetrics,
    clip_score_metric,
    fid_metric,
    held_out,
    to_uint8,
)
from sdtrain.cli.shards import main as shards_main
from sdtrain.cli.train import instantiate_map, train
from sdtrain.datamodules.transforms import decode_image
from sdtrain.demo import shapes as demo
from tests.conftest import compose_cfg
from tests.metrics_fixtures import TinyFeatures, make_tiny_clip

KEY = "callbacks.image_metrics"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def read_metrics(run: Path) -> list[dict[str, str]]:
    (metrics,) = run.glob("csv/version_*/metrics.csv")
    return list(csv.DictReader(metrics.open()))


def logged(rows: list[dict[str, str]], name: str) -> dict[int, float]:
    """step -> value of `name` in the CSV logger's rows."""
    return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}


def run_overrides(model: Path, shards: str, steps: int, every: int) -> list[str]:
    """The tiny model on the test shards, CPU, the image metrics as the only callback."""
    return [
        f"model.pretrained={model}",
        "data=webdataset",  # your own shards (the demo group refuses them)
        f"data.train_shards='{shards}'",
        "data.resolution=32",
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.accelerator=cpu",
        f"trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
        "++trainer.enable_checkpointing=false",
        "callbacks=[image_metrics]",
        "logger=csv",
        f"{KEY}.every_n_steps={every}",
        f"{KEY}.num_images=4",
        f"{KEY}.num_inference_steps=2",
        f"{KEY}.batch_size=2",
    ]


def test_fid_against_the_same_set_is_zero_and_against_another_positive(tmp_path: Path):
    demo.write_folder(tmp_path / "a", 24, 32, seed=0)
    demo.write_folder(tmp_path / "b", 24, 32, seed=1)
    shards_main(
        [str(tmp_path / "a"), str(tmp_path / "tars"), "--samples-per-shard", "10", "--keep-order"]
    )
    pattern = str(tmp_path / "tars" / "{00000..00002}.tar")
    from_folder, from_shards = list(held_out(str(tmp_path / "a"))), list(held_out(pattern))
    # the folder and the shards written from it are one set, in one order
    assert [c for _, c in from_shards] == [c for _, c in from_folder] and len(from_folder) == 24

    def images(samples) -> list:
        return [decode_image(data) for data, _ in samples]

    fid = fid_metric(TinyFeatures(), None)
    fid.update(to_uint8(images(from_folder)), real=True)
    fid.update(to_uint8(images(from_shards)), real=False)
    same = float(fid.compute())
    fid.reset()  # the fake side only: the real one is kept
    fid.update(to_uint8(images(held_out(str(tmp_path / "b")))), real=False)
    other = float(fid.compute())
    assert abs(same) < 1e-3
    assert other > 0.01


def test_clip_score_is_100_times_the_cosine_the_clip_model_gives(tiny_clip: Path):
    from transformers import CLIPModel, CLIPProcessor

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen)
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    metric = clip_score_metric(str(tiny_clip))
    metric.update(images, captions)
    score = float(metric.compute())
    # the same pairs through the model's own forward (not the feature methods the metric calls)
    model, processor = (
        CLIPModel.from_pretrained(tiny_clip),
        CLIPProcessor.from_pretrained(tiny_clip),
    )
    inputs = processor(text=captions, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert 0 < score < 100
    assert score == pytest.approx(100 * cosine.mean().item(), rel=1e-4)


def test_run_logs_clip_score_and_fid(tiny_model: Path, shards: str, tiny_clip: Path, tmp_path):
    overrides = run_overrides(tiny_model, shards, steps=4, every=2) + [
        f"{KEY}.clip_model={tiny_clip}",
        f"{KEY}.fid_reference='{shards}'",
        f"{KEY}.num_reference=16",
        f"{KEY}.fid_feature={{_target_:tests.metrics_fixtures.TinyFeatures}}",
        "optimized_metric=val/fid",
    ]
    returned = train(compose_cfg(tmp_path, overrides))
    rows = read_metrics(tmp_path)
    clip, fid = logged(rows, "val/clip_score"), logged(rows, "val/fid")
    assert sorted(clip) == sorted(fid) == [2, 4]
    assert all(math.isfinite(v) for v in [*clip.values(), *fid.values()])
    assert all(0 < v < 100 for v in clip.values())
    assert fid[4] > 0.01  # an untrained model's noise is far from the held-out shapes
    assert returned == pytest.approx(fid[4])  # a sweep can optimize it


def test_a_missing_path_warns_once_and_skips_only_its_metric(
    tiny_model: Path, shards: str, tiny_clip: Path, tmp_path: Path, caplog
):
    missing = tmp_path / "nowhere" / "{00000..00001}.tar"
    overrides = run_overrides(tiny_model, shards, steps=3, every=1) + [
        f"{KEY}.prompts=[a red circle,a blue square]",
        f"{KEY}.clip_model={tiny_clip}",
        f"{KEY}.fid_reference='{missing}'",
        f"{KEY}.fid_feature={{_target_:tests.metrics_fixtures.TinyFeatures}}",
    ]
    with caplog.at_level(logging.WARNING, logger="sdtrain.callbacks.image_metrics"):
        assert train(compose_cfg(tmp_path, overrides)) is not None
    warned = [r.getMessage() for r in caplog.records if r.name.endswith("image_metrics")]
    assert len(warned) == 1, warned
    assert f"{KEY}.fid_reference={missing}" in warned[0] and "no val/fid" in warned[0]
    rows = read_metrics(tmp_path)
    assert sorted(logged(rows, "val/clip_score")) == [1, 2, 3]
    assert not logged(rows, "val/fid")


def test_null_paths_warn_once_per_run(caplog, tmp_path: Path):
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    metrics = ImageMetrics(prompts=["a red circle"], num_images=2)
    with caplog.at_level(logging.WARNING, logger="sdtrain.callbacks.image_metrics"):
        for _ in range(3):  # Lightning calls setup once per fit; even so, it warns once
            metrics.setup(trainer, None, "fit")
    warned = [r.getMessage() for r in caplog.records if r.name.endswith("image_metrics")]
    assert warned == [
        f"{KEY}.clip_model is null: no val/clip_score this run",
        f"{KEY}.fid_reference is null: no val/fid this run",
    ]
    assert metrics.clip is None and metrics.fid is None
    assert metrics.measure(trainer, None) == {}  # nothing sampled, nothing logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdtrain.callbacks.image_metrics"):
        ImageMetrics(prompts=None, clip_model="/nowhere").setup(trainer, None, "fit")
    assert [r.getMessage() for r in caplog.records] == [
        f"{KEY}.fid_reference is null and prompts is null: nothing to sample, "
        "no image metrics this run"
    ]


def test_the_config_adds_to_the_default_callbacks(tmp_path: Path):
    cfg = compose_cfg(tmp_path, ["callbacks=[default,image_metrics]"])
    assert {"sample_images", "model_checkpoint", "image_metrics"} <= set(cfg.callbacks)
    (metrics,) = [c for c in instantiate_map(cfg.callbacks) if isinstance(c, ImageMetrics)]
    assert metrics.clip_model is None and metrics.fid_reference is None  # off unless paths given


def test_bad_values_name_the_key(tmp_path: Path, tiny_clip: Path):
    with pytest.raises(ValueError, match=rf"{KEY}\.num_images=1"):
        ImageMetrics(num_images=1)
    with pytest.raises(ValueError, match=rf"{KEY}\.prompts is empty"):
        ImageMetrics(prompts=[])
    not_clip = tmp_path / "not-clip"
    not_clip.mkdir()
    metrics = ImageMetrics(prompts=["a red circle"], clip_model=str(not_clip))
    with pytest.raises(ValueError, match=rf"{KEY}\.clip_model={not_clip}: not a CLIP"):
        metrics.setup(L.Trainer(accelerator="cpu", logger=False), None, "fit")


@pytest.mark.slow
def test_two_ddp_ranks_agree_with_one_process(
    tiny_model: Path, shards: str, tiny_clip: Path, tmp_path: Path
):
    """Each rank samples every other image (rank 1 pads its odd share) and reads every other
    held-out image; torchmetrics sums both ranks' shares, so with frozen weights (lr 0) the values
    are those of one process doing it all."""
    from tests.test_train import _cli

    overrides = run_overrides(tiny_model, shards, steps=2, every=0) + [
        f"{KEY}.num_images=5",
        f"{KEY}.clip_model={tiny_clip}",
        f"{KEY}.fid_reference='{shards}'",
        f"{KEY}.num_reference=15",
        f"{KEY}.fid_feature={{_target_:tests.metrics_fixtures.TinyFeatures}}",
        "model.optimizer.lr=0",
        "trainer.precision=32-true",
    ]
    train(compose_cfg(tmp_path / "one", overrides))
    ddp = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=2",
    ]
    proc = _cli(overrides + ddp + [f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for name in ("val/clip_score", "val/fid"):
        assert list(logged(two, name)) == [2], name
        assert logged(two, name)[2] == pytest.approx(logged(one, name)[2], rel=1e-3), name
