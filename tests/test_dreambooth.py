"""DreamBooth with prior preservation (issue 31 item 1): class images drawn once by the base model
and reused, batches of a fixed instance/class split, the prior-loss weight, full and LoRA runs,
SD and SDXL."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from sdtrain.artifacts.class_images import ClassImages, ensure_class_images, fill_class_shards
from sdtrain.datamodules.dreambooth import CLASS, INSTANCE, DreamBoothDataModule
from sdtrain.demo import shapes
from sdtrain.training import diffusion, prior
from tests.conftest import compose_cfg

SPEC = dict(num_images=3, resolution=32, steps=2, batch_size=2, device="cpu")


def read_shards(folder: Path) -> list[dict]:
    samples = wds.DataPipeline(wds.SimpleShardList([str(p) for p in sorted(folder.glob("*.tar"))]),
                               wds.tarfile_to_samples())  # fmt: skip
    return list(samples)


def subject_shards(tmp: Path, n: int = 4, bad: int = 0) -> Path:
    """`n` yellow squares captioned "a sks square" in one shard, then `bad` unreadable images."""
    out = tmp / "subject"
    out.mkdir()
    rng = random.Random(0)
    with wds.TarWriter(str(out / "00000.tar")) as sink:
        for i in range(n + bad):
            buf = io.BytesIO()
            shapes.render("yellow", "square", 32, rng).save(buf, "PNG")
            png = buf.getvalue() if i < n else b"not a png"
            sink.write({"__key__": f"{i:04d}", "png": png, "txt": b"a sks square"})
    return out


def test_class_images_are_drawn_once_reused_then_drawn_anew_for_a_new_prompt(
    tiny_model: Path, tmp_path: Path, caplog
):
    from sdtrain.artifacts.sample import Settings, load_pipeline, sample

    cache = tmp_path / "class_images"
    spec = ClassImages("a square", **SPEC)
    folder = ensure_class_images(spec, cache, tiny_model)
    samples = read_shards(folder)
    assert [s["txt"].decode() for s in samples] == ["a square"] * 3
    images = [Image.open(io.BytesIO(s["png"])) for s in samples]
    assert all(img.size == (32, 32) for img in images)
    # the base model's own sampling drew them: image i from seed i (2 a call, as drawn)
    pipe = load_pipeline(tiny_model, "ddim")
    again = sample(pipe, Settings(["a square"], [0, 1, 2], 2, 5.0, "ddim", 32, 32, 2))
    for got, want in zip(images, again, strict=True):
        assert torch.equal(torch.tensor(list(got.getdata())), torch.tensor(list(want.getdata())))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["recipe"]["prompt"] == "a square" and manifest["recipe"]["num_images"] == 3

    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with caplog.at_level(logging.INFO, logger="sdtrain.artifacts.class_images"):
        same = ensure_class_images(ClassImages("a square", **(SPEC | {"batch_size": 3})), cache,
                                   tiny_model)  # fmt: skip
    assert same == folder and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert "reused" in caplog.text and "drawing" not in caplog.text

    other = ensure_class_images(ClassImages("a circle", **SPEC), cache, tiny_model)
    assert other != folder and folder.is_dir()
    assert [s["txt"].decode() for s in read_shards(other)] == ["a circle"] * 3
    more = ensure_class_images(ClassImages("a square", **(SPEC | {"num_images": 4})), cache,
                               tiny_model)  # fmt: skip
    assert more not in (folder, other) and len(read_shards(more)) == 4


def datamodule(instance: Path, klass: str, **kw) -> DreamBoothDataModule:
    args = dict(tokenizer="unused", resolution=32, batch_size=3, num_workers=0, shuffle_buffer=10)
    spec = {"instance_shards": str(instance), "class_shards": klass, "class_per_batch": 1}
    return DreamBoothDataModule(dreambooth=spec | kw.pop("dreambooth", {}), **(args | kw))


@pytest.mark.parametrize("workers", [0, 2])
def test_every_batch_holds_the_fixed_split(
    workers: int, tiny_model: Path, shards: str, tmp_path: Path
):
    """2 instance + 1 class sample a batch, flagged by source, also with an unreadable instance
    image in the stream and through DataLoader workers."""
    dm = datamodule(subject_shards(tmp_path, 4, bad=1), shards, tokenizer=str(tiny_model),
                    num_workers=workers)  # fmt: skip
    dm.setup()
    it = iter(dm.train_dataloader())
    skipped = 0
    for _ in range(12):
        batch = next(it)
        assert batch["sources"] == [INSTANCE, INSTANCE, CLASS]
        assert batch["captions"][:2] == ["a sks square"] * 2
        assert batch["captions"][2] != "a sks square"  # a demo caption ("a red circle")
        assert batch["pixels"].shape == (3, 3, 32, 32)
        skipped += batch["skipped_sources"][INSTANCE]
    assert skipped >= 1  # the bad image was met, and the split held


def test_no_prior_preservation_trains_on_the_instance_set_alone(tmp_path: Path, tiny_model: Path):
    dm = datamodule(subject_shards(tmp_path), None, tokenizer=str(tiny_model),
                    dreambooth={"class_per_batch": 0, "class_shards": None})  # fmt: skip
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["sources"] == [INSTANCE] * 3


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"resampled": False}, "data.resampled=false"),
        ({"buckets": "auto"}, "data.buckets"),
        ({"train_shards": "/x"}, "data.train_shards"),
        ({"dreambooth": {"class_per_batch": 3}}, "data.dreambooth.class_per_batch=3"),
        ({"dreambooth": {"class_per_batch": -1}}, "data.dreambooth.class_per_batch=-1"),
        ({"dreambooth": {"instance_shards": None}}, "data.dreambooth.instance_shards=None"),
        ({"dreambooth": {"prompt": "a dog"}}, "unknown key(s) ['prompt']"),
        ({"dreambooth": {"class_shards": None}}, "data.dreambooth.class_shards=null"),
    ],
)  # fmt: skip
def test_bad_settings_are_named(change: dict, named: str, shards: str, tmp_path: Path):
    with pytest.raises(ValueError) as e:
        datamodule(subject_shards(tmp_path), shards, **change)
    assert named in str(e.value)


@pytest.mark.parametrize(
    ("images", "named"),
    [
        ({"prompt": "x", "num_images": 0, "resolution": 32}, "class_images.num_images=0"),
        ({"prompt": " ", "num_images": 2, "resolution": 32}, "class_images.prompt=' '"),
        ({"prompt": "x", "num_images": 2, "resolution": 32, "dtype": "fp8"}, "dtype='fp8'"),
        ({"prompt": "x", "num_images": 2, "resolution": 32, "size": 3}, "'size'"),
        (None, "data.dreambooth.class_images=None"),
    ],
)
def test_bad_class_image_settings_are_named(images, named: str, tmp_path: Path):
    data = {"dreambooth": {"class_images": images, "cache_dir": str(tmp_path), "pretrained": "/m"}}
    with pytest.raises(ValueError, match=re.escape(named)):
        fill_class_shards(data)


@pytest.mark.parametrize("split", [(2, 2), (3, 1), (1, 3)])
def test_prior_weights_give_dreambooths_loss(split: tuple[int, int]):
    """The step's weighted mean equals diffusers' train_dreambooth.py loss (instance MSE + lambda x
    prior MSE, each a mean over its own samples): the value and the gradient."""
    k, m = split
    lam = 0.7
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(k + m, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(k + m, 4, 8, 8, generator=g)
    batch = {"sources": [INSTANCE] * k + [CLASS] * m}
    ours = diffusion.diffusion_loss(pred, target, prior.prior_weights(batch, lam, pred.device))
    (grad_ours,) = torch.autograd.grad(ours, pred)
    # diffusers: model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0), generalised
    theirs = F.mse_loss(pred[:k], target[:k]) + lam * F.mse_loss(pred[k:], target[k:])
    (grad_theirs,) = torch.autograd.grad(theirs, pred)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_ours, grad_theirs)
    snr = torch.rand(k + m, generator=g)  # min-SNR's weights multiply DreamBooth's
    both = prior.times_prior_weights(snr, batch, lam, pred.device)
    torch.testing.assert_close(both, snr * prior.prior_weights(batch, lam, pred.device))
    assert prior.times_prior_weights(snr, {"sources": [INSTANCE] * (k + m)}, lam, "cpu") is snr
    assert prior.prior_weights({"sources": [INSTANCE] * 4}, lam, pred.device) is None
    assert prior.prior_weights(batch, None, pred.device) is None
    with pytest.raises(ValueError, match="model.prior_loss_weight=-1"):
        prior.check_weight(-1)


def dreambooth_run(
    tmp: Path, model: Path, instance: Path, *overrides: str, experiment: str = "dreambooth"
) -> dict:
    """Two steps of experiment=dreambooth on the tiny model at 32 px; the checkpoint it leaves."""
    from sdtrain.cli.train import train

    train(compose_cfg(tmp, [
        f"experiment={experiment}", f"model.pretrained={model}",
        f"data.dreambooth.instance_shards={instance}", "data.dreambooth.class_images.prompt=a square",
        "data.dreambooth.class_images.num_images=2", "data.dreambooth.class_images.steps=2",
        f"data.dreambooth.cache_dir={tmp.parent / 'class_images'}", "data.resolution=32",
        "data.num_workers=0", "trainer=cpu", "trainer.max_steps=2", "logger=none",
        "model.optimizer.lr=1e-3", "callbacks.sample_images.num_inference_steps=2",
        "callbacks.sample_images.every_n_steps=2", *overrides,
    ]))  # fmt: skip
    return torch.load(tmp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_class_samples_train_by_the_prior_loss_weight(
    tiny_model: Path, shards: str, tmp_path: Path
):
    """Through sdtrain-train: the class images drawn by the base train at weight 1; at weight 0
    the U-Net takes the same steps whatever the class images are (their loss counts nothing)."""
    instance = subject_shards(tmp_path)
    drawn = dreambooth_run(tmp_path / "a", tiny_model, instance)

    def sets() -> list[Path]:
        return [p for p in (tmp_path / "class_images").iterdir() if not p.name.startswith(".")]

    (folder,) = sets()  # drawn once, in the cache
    assert drawn["global_step"] == 2
    zero = ["model.prior_loss_weight=0"]
    zero_drawn = dreambooth_run(tmp_path / "b", tiny_model, instance, *zero)
    other = dreambooth_run(tmp_path / "c", tiny_model, instance, *zero,
                           f"data.dreambooth.class_shards='{shards}'")  # fmt: skip
    assert sets() == [folder]  # reused, not drawn again
    unet = [k for k in drawn["state_dict"] if k.startswith("unet.")]
    assert unet
    for key in unet:
        torch.testing.assert_close(zero_drawn["state_dict"][key], other["state_dict"][key])
    assert any(not torch.equal(drawn["state_dict"][k], zero_drawn["state_dict"][k]) for k in unet)


def test_dreambooth_lora_trains_the_adapters(tiny_model: Path, tmp_path: Path):
    instance = subject_shards(tmp_path)
    ckpt = dreambooth_run(tmp_path / "run", tiny_model, instance, experiment="dreambooth_lora")
    keys = ckpt["state_dict"].keys()
    assert ckpt["global_step"] == 2 and keys and all("lora_" in k for k in keys)


def test_dreambooth_on_sdxl(tiny_sdxl: Path, tmp_path: Path):
    """The family seam: an SDXL base draws its class images with its own pipeline (at the size
    asked) and trains on both sets, size conditioning included."""
    ckpt = dreambooth_run(tmp_path / "run", tiny_sdxl, subject_shards(tmp_path))
    assert ckpt["global_step"] == 2
    assert any(k.startswith("unet.add_embedding.") for k in ckpt["state_dict"])
    (folder,) = [p for p in (tmp_path / "class_images").iterdir() if not p.name.startswith(".")]
    samples = read_shards(folder)
    assert len(samples) == 2 and [s["txt"] for s in samples] == [b"a square"] * 2
    assert Image.open(io.BytesIO(samples[0]["png"])).size == (32, 32)


@pytest.mark.slow
def test_prior_preservation_keeps_the_class_prompt_near_the_base(demo_run: Path, tmp_path: Path):
    """On the demo model (conftest's `demo_run`): 300 DreamBooth steps on 5 green squares
    captioned "a sks square" (the base draws that prompt as yellow squares) move the instance
    prompt to green squares, and with prior preservation "a square" stays close to the base's
    samples (scripts/dreambooth_demo.py measures; the README gives its numbers), much
    closer than without."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "db"
    cmd = [sys.executable, str(ROOT / "scripts" / "dreambooth_demo.py"), str(out), "--base",
           str(demo_run), "--steps", "300", "--seeds", "16", "--class-images", "50"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((out / "dreambooth_demo.json").read_text())["rows"]
    base, kept, lost = rows["base"], rows["prior"], rows["no_prior"]
    assert base["instance_subject"] <= 0.25 and kept["instance_subject"] >= 0.5
    assert kept["class_subject_colour"] <= 0.25  # "a square" has not turned into the subject
    assert kept["class_pixel_diff"] < 0.5 * lost["class_pixel_diff"]
