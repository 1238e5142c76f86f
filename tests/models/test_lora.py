"""LoRA through peft and a trained text encoder, end to end on the tiny model: what trains, what a
checkpoint keeps, resume, and the exported files read back by diffusers (both LoRA layouts)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from sdtrain.artifacts import checkpoint
from sdtrain.artifacts.export_lora import DIFFUSERS_NAME, KOHYA_NAME
from sdtrain.artifacts.sampling import build_pipeline
from sdtrain.cli.export import main as export_main
from sdtrain.cli.train import train
from sdtrain.models import lora
from sdtrain.models.loader import load_parts
from tests.conftest import compose_cfg, tiny_overrides

# experiment=lora targets GPUs at 512 px: two-or-four CPU steps at 32 px here, and a learning rate
# large enough that a few steps change the images measurably.
CPU = [
    "experiment=lora",
    "logger=none",
    "trainer.precision=32-true",
    "data.resolution=32",
    "callbacks.sample_images.height=32",
    "callbacks.sample_images.width=32",
    "model.optimizer.lr=3e-2",
    "model.lr_scheduler.num_warmup_steps=0",
]


class Keep(L.Callback):
    """Holds the trained module and what the optimizer saw."""

    last: Keep | None = None

    def on_train_start(self, trainer, pl_module):
        Keep.last = self
        self.module = pl_module
        self.start_text = {k: v.clone() for k, v in pl_module.text_encoder.state_dict().items()}
        self.start_unet = {k: v.clone() for k, v in pl_module.unet.state_dict().items()}
        self.groups = [
            {"n": len(g["params"]), "lr": g["initial_lr"], "name": g.get("name")}
            for g in trainer.optimizers[0].param_groups
        ]


def run(tmp: Path, overrides: list[str]) -> Keep:
    cfg = compose_cfg(tmp, overrides)
    with open_dict(cfg):
        cfg.callbacks.keep = {"_target_": "tests.models.test_lora.Keep"}
    train(cfg)
    return Keep.last


def image(pipe, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    kw = {"num_inference_steps": 3, "guidance_scale": 1.0, "height": 32, "width": 32}
    return pipe("a red circle", generator=g, output_type="np", **kw).images[0]


def base_pipeline(model: Path):
    p = load_parts(model)
    return build_pipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, p.noise_scheduler, "ddim")


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, shards: str, tmp_path_factory) -> tuple[Keep, Path]:
    out = tmp_path_factory.mktemp("lora-run")
    keep = run(out, tiny_overrides(tiny_model, shards, 4) + CPU)
    return keep, out / "checkpoints" / "last.ckpt"


def test_only_the_adapters_train_and_the_checkpoint_keeps_them(lora_run, tiny_model: Path):
    keep, ckpt_path = lora_run
    module = keep.module
    names = [n for n, _ in module.trainable_parameters()]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names[:3]
    # the base U-Net and the text encoder are exactly the pretrained ones
    base = load_parts(tiny_model)
    trained = {k.replace(".base_layer", ""): v for k, v in module.unet.state_dict().items()}
    for k, v in base.unet.state_dict().items():
        assert torch.equal(trained[k], v), k
    for k, v in base.text_encoder.state_dict().items():
        assert torch.equal(module.text_encoder.state_dict()[k], v), k
    # the adapters moved (B starts at zero), and so did their EMA
    params = dict(module.trainable_parameters())
    assert all(not keep.start_unet[n].any() for n in names if ".lora_B." in n)
    assert max(params[n].abs().max().item() for n in names if ".lora_B." in n) > 1e-3
    shadow = module.ema.shadow
    assert shadow.keys() == params.keys()
    assert any(shadow[n].abs().max() > 1e-4 for n in names if ".lora_B." in n)
    # the checkpoint holds the adapters and how they were built, nothing else
    ckpt = checkpoint.load(ckpt_path)
    assert set(ckpt["state_dict"]) == {f"unet.{n}" for n in names}
    assert checkpoint.ema_state(ckpt)["shadow"].keys() == params.keys()
    recorded = checkpoint.run_info(ckpt)["lora"]
    assert recorded["rank"] == 16 and recorded["target_modules"] == sorted(lora.UNET_TARGETS)
    assert recorded["text_encoder"] is False
    assert keep.groups == [{"n": len(names), "lr": pytest.approx(3e-2), "name": None}]


def test_lora_run_resumes(lora_run, tiny_model: Path, shards: str, tmp_path: Path):
    _, ckpt_path = lora_run
    saved = checkpoint.load(ckpt_path)
    keep = run(tmp_path, tiny_overrides(tiny_model, shards, 5) + CPU + [f"ckpt_path={ckpt_path}"])
    assert keep.module.global_step == 5
    for key, value in saved["state_dict"].items():
        assert torch.equal(keep.start_unet[key.removeprefix("unet.")], value), key


def test_exported_lora_files_load_in_diffusers(lora_run, tiny_model: Path, tmp_path: Path):
    """Both files load with `pipe.load_lora_weights` into the base pipeline and give the trained
    module's image (EMA weights); the base pipeline's image differs; a plain export fuses."""
    from diffusers import StableDiffusionPipeline

    keep, ckpt_path = lora_run
    export_main([str(ckpt_path), str(tmp_path / "lora"), "--lora"])
    with keep.module.ema_weights():
        trained = image(keep.module.pipeline("ddim"))
    base = base_pipeline(tiny_model)
    before = image(base)
    assert np.abs(trained - before).mean() > 0.01  # training changed the images measurably

    base.load_lora_weights(tmp_path / "lora")  # finds pytorch_lora_weights.safetensors
    np.testing.assert_allclose(image(base), trained, atol=2e-3)
    kohya = load_file(tmp_path / "lora" / KOHYA_NAME)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
    other = base_pipeline(tiny_model)
    other.load_lora_weights(str(tmp_path / "lora" / KOHYA_NAME))
    np.testing.assert_allclose(image(other), trained, atol=2e-3)

    export_main([str(ckpt_path), str(tmp_path / "fused")])  # the diffusers folder, LoRA merged
    folder = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
    folder.scheduler = base.scheduler
    folder.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(image(folder), trained, atol=2e-3)
    assert not any("lora" in k for k in folder.unet.state_dict())


def test_lora_export_never_clobbers(lora_run, tmp_path: Path):
    """A used OUT needs --overwrite, which replaces the folder (raw weights here); files 0644."""
    _, ckpt_path = lora_run
    out = tmp_path / "lora"
    export_main([str(ckpt_path), str(out), "--lora"])
    ema = {name: (out / name).read_bytes() for name in (DIFFUSERS_NAME, KOHYA_NAME)}
    with pytest.raises(SystemExit, match=f"{out} already holds an export: pass --overwrite"):
        export_main([str(ckpt_path), str(out), "--lora", "--no-ema"])
    assert {name: (out / name).read_bytes() for name in ema} == ema
    mask = os.umask(0o022)
    try:
        export_main([str(ckpt_path), str(out), "--lora", "--no-ema", "--overwrite"])
    finally:
        os.umask(mask)
    assert sorted(p.name for p in out.iterdir()) == sorted(ema)
    assert all((out / name).read_bytes() != ema[name] for name in ema)  # the raw adapters now
    assert {stat.S_IMODE((out / name).stat().st_mode) for name in ema} == {0o644}


# alpha != rank: every other run here has alpha = rank (scale 1), which hides a scale dropped or
# applied twice anywhere between training and the files
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def scaled_lora_run(tiny_model: Path, shards: str, tmp_path_factory) -> tuple[Keep, Path]:
    """experiment=lora with rank 4 and alpha 8 (scale 2), 2 steps."""
    out = tmp_path_factory.mktemp("scaled-lora-run")
    scaled = [f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}"]
    keep = run(out, tiny_overrides(tiny_model, shards, 2) + CPU + scaled)
    return keep, out / "checkpoints" / "last.ckpt"


def test_lora_alpha_other_than_rank_trains_and_exports_scaled(
    scaled_lora_run, tiny_model: Path, tmp_path: Path
):
    """rank 4, alpha 8: training, the merged export, diffusers' and kohya's files all apply
    W = W0 + (alpha / rank) * B @ A, computed here from the checkpoint's adapter tensors (the
    EMA's, which export writes); diffusers' load_lora_weights on the file gives the merged U-Net's
    outputs, which are the trained module's."""
    from diffusers import UNet2DConditionModel

    keep, ckpt_path = scaled_lora_run
    ckpt = checkpoint.load(ckpt_path)
    recorded = checkpoint.run_info(ckpt)["lora"]
    assert (recorded["rank"], recorded["alpha"]) == (RANK, ALPHA)
    shadow = checkpoint.ema_state(ckpt)["shadow"]
    a_suffix, b_suffix = ".lora_A.default.weight", ".lora_B.default.weight"
    A = {k.removesuffix(a_suffix): v.double() for k, v in shadow.items() if k.endswith(a_suffix)}
    B = {k.removesuffix(b_suffix): v.double() for k, v in shadow.items() if k.endswith(b_suffix)}
    assert A and A.keys() == B.keys() and len(shadow) == 2 * len(A)
    assert all(a.shape[0] == RANK and B[m].shape[1] == RANK for m, a in A.items())
    delta = {m: (ALPHA / RANK) * (B[m] @ A[m]) for m in A}  # the update each projection gets
    assert max(d.abs().max().item() for d in delta.values()) > 1e-3  # the adapters moved

    # the merged export: base + (alpha / rank) * B @ A on every adapted projection, the rest as is
    export_main([str(ckpt_path), str(tmp_path / "fused")])
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "fused" / "unet").eval()
    got = merged.state_dict()
    base = load_parts(tiny_model).unet.state_dict()
    assert got.keys() == base.keys()
    adapted = {f"{m}.weight" for m in delta}
    assert adapted <= base.keys()
    for m, d in delta.items():
        want = base[f"{m}.weight"].double() + d
        torch.testing.assert_close(got[f"{m}.weight"].double(), want, rtol=0, atol=1e-6, msg=m)
    assert all(torch.equal(got[k], v) for k, v in base.items() if k not in adapted)

    # the LoRA files: the scale folded into up, so up @ down (diffusers) and alpha / rank *
    # up @ down (kohya, which states its alpha) are the same update
    export_main([str(ckpt_path), str(tmp_path / "lora"), "--lora"])
    ours = load_file(tmp_path / "lora" / DIFFUSERS_NAME)
    kohya = load_file(tmp_path / "lora" / KOHYA_NAME)
    assert len(ours) == len(shadow) and len(kohya) == 3 * len(A)
    for m, d in delta.items():
        up, down = ours[f"unet.{m}.lora.up.weight"], ours[f"unet.{m}.lora.down.weight"]
        torch.testing.assert_close(up.double() @ down.double(), d, rtol=0, atol=1e-6, msg=m)
        k = "lora_unet_" + m.replace(".", "_")
        up, down = kohya[f"{k}.lora_up.weight"], kohya[f"{k}.lora_down.weight"]
        scale = kohya[f"{k}.alpha"].item() / down.shape[0]
        torch.testing.assert_close(scale * up.double() @ down.double(), d, rtol=0, atol=1e-6)

    # diffusers reads the file into the base U-Net: the merged U-Net's outputs, and the trained
    # module's (its adapters, EMA weights, at peft's alpha / rank); the base U-Net's differ
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 500])
    c = torch.randn(2, 77, merged.config.cross_attention_dim, generator=g)
    pipe = base_pipeline(tiny_model)
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=c).sample
        pipe.load_lora_weights(tmp_path / "lora")  # finds pytorch_lora_weights.safetensors
        loaded = pipe.unet(x, t, encoder_hidden_states=c).sample
        want = merged(x, t, encoder_hidden_states=c).sample
        with keep.module.ema_weights():
            trained = keep.module.unet.eval()(x, t, encoder_hidden_states=c).sample
    assert (before - want).abs().max() > 1e-3  # the update changes the outputs measurably
    torch.testing.assert_close(loaded, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained, want, rtol=1e-5, atol=1e-5)


def test_export_lora_of_a_full_run_is_refused(tiny_model: Path, shards: str, tmp_path: Path):
    cfg = tiny_overrides(tiny_model, shards, 1) + ["logger=none"]
    train(compose_cfg(tmp_path, cfg))
    with pytest.raises(SystemExit, match=r"last.ckpt: the run trained no LoRA"):
        export_main([str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "x"), "--lora"])


def test_text_encoder_fine_tune(tiny_model: Path, shards: str, tmp_path: Path):
    """model.train_text_encoder: it trains in its own optimizer group, its EMA and weights are
    saved, resume restores them, and the export holds its EMA weights."""
    from transformers import CLIPTextModel

    te = ["model.train_text_encoder=true", "model.text_encoder_lr=5e-4", "logger=none"]
    keep = run(tmp_path / "a", tiny_overrides(tiny_model, shards, 2) + te)
    unet_n = sum(1 for _ in keep.module.unet.parameters())
    text_n = sum(1 for _ in keep.module.text_encoder.parameters())
    assert [(g["n"], g["name"]) for g in keep.groups] == [
        (unet_n, "unet"),
        (text_n, "text_encoder"),
    ]
    assert keep.groups[1]["lr"] == pytest.approx(5e-4) != keep.groups[0]["lr"]
    now = keep.module.text_encoder.state_dict()
    assert any(not torch.equal(now[k], v) for k, v in keep.start_text.items())
    ckpt_path = tmp_path / "a" / "checkpoints" / "last.ckpt"
    ckpt = checkpoint.load(ckpt_path)
    text_keys = {f"text_encoder.{k}" for k in now}
    assert text_keys <= set(ckpt["state_dict"]) and text_keys <= set(
        ckpt["sdtrain"]["ema"]["shadow"]
    )
    for k, v in now.items():
        assert torch.equal(ckpt["state_dict"][f"text_encoder.{k}"], v), k

    resumed = run(
        tmp_path / "b", tiny_overrides(tiny_model, shards, 3) + te + [f"ckpt_path={ckpt_path}"]
    )
    assert all(torch.equal(resumed.start_text[k], v) for k, v in now.items())

    export_main([str(ckpt_path), str(tmp_path / "out")])
    exported = CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder").state_dict()
    ema = checkpoint.text_encoder_weights(ckpt, ema=True)
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


@pytest.fixture(scope="module")
def text_lora_run(tiny_model: Path, shards: str, tmp_path_factory) -> tuple[Keep, Path]:
    """experiment=lora with adapters on the text encoder too, exported with --lora."""
    out = tmp_path_factory.mktemp("text-lora-run")
    extra = ["model.lora.text_encoder=true", "model.text_encoder_lr=1e-2"]
    keep = run(out, tiny_overrides(tiny_model, shards, 2) + CPU + extra)
    export_main([str(out / "checkpoints" / "last.ckpt"), str(out / "lora"), "--lora"])
    return keep, out / "lora"


def test_text_encoder_lora(text_lora_run, tiny_model: Path):
    """model.lora.text_encoder: adapters on both, in two optimizer groups; the text encoder's base
    stays; both files hold its adapters under the names readers know, and diffusers parses the
    kohya file into the same tensors as diffusers' own file."""
    from diffusers import StableDiffusionPipeline

    keep, folder = text_lora_run
    text = [n for n, _ in keep.module.trainable_parameters() if n.startswith("text_encoder.")]
    assert text and all(".lora_" in n for n in text)
    assert [(g["name"], g["lr"]) for g in keep.groups] == [
        ("unet", pytest.approx(3e-2)),
        ("text_encoder", pytest.approx(1e-2)),
    ]
    base = load_parts(tiny_model).text_encoder.state_dict()
    now = {
        k.replace(".base_layer", ""): v for k, v in keep.module.text_encoder.state_dict().items()
    }
    assert all(torch.equal(now[k], v) for k, v in base.items())
    ours = load_file(folder / DIFFUSERS_NAME)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in ours)
    kohya = load_file(folder / KOHYA_NAME)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    parsed, _ = StableDiffusionPipeline.lora_state_dict(str(folder / KOHYA_NAME))

    def fingerprint(state):
        te = [v for k, v in state.items() if k.startswith("text_encoder.")]
        return sorted((tuple(v.shape), round(v.double().sum().item(), 4)) for v in te)

    assert fingerprint(parsed) == fingerprint(ours) and len(fingerprint(ours)) == 2 * 4 * 2

    # without --lora the adapters are merged: a plain text encoder, the trained one's output
    from transformers import CLIPTextModel

    export_main([str(folder.parent / "checkpoints" / "last.ckpt"), str(folder.parent / "fused")])
    fused = CLIPTextModel.from_pretrained(folder.parent / "fused" / "text_encoder")
    assert not any("lora" in k for k in fused.state_dict())
    ids = torch.randint(0, 40, (2, 77))
    with torch.no_grad(), keep.module.ema_weights():
        torch.testing.assert_close(fused(ids)[0], keep.module.text_encoder(ids)[0])


def test_text_encoder_lora_loads_in_diffusers(text_lora_run, tiny_model: Path):
    """Each file, read by `pipe.load_lora_weights` into the base pipeline, puts the adapters into its
    text encoder as well as its U-Net: the text encoder then encodes the prompt as the trained one
    does, and the pipeline draws the trained images. (diffusers adds them with transformers'
    `load_adapter`, which asks for no peft version; the tiny U-Net barely listens to its text, so
    the text encoder's output, not the image, shows its adapters.)"""
    keep, folder = text_lora_run
    with keep.module.ema_weights():
        trained = image(keep.module.pipeline("ddim"))
        trained_text = encode(keep.module.text_encoder, keep.module.tokenizer)
    base = base_pipeline(tiny_model)
    assert (encode(base.text_encoder, base.tokenizer) - trained_text).abs().max() > 0.1
    assert np.abs(image(base) - trained).mean() > 0.01  # training changed the images measurably

    for source in (folder, folder / KOHYA_NAME):
        pipe = base_pipeline(tiny_model)
        pipe.load_lora_weights(str(source))
        torch.testing.assert_close(encode(pipe.text_encoder, pipe.tokenizer), trained_text)
        np.testing.assert_allclose(image(pipe), trained, atol=2e-3)


@torch.no_grad()
def encode(text_encoder, tokenizer) -> torch.Tensor:
    """The prompt's CLIP context, (1, 77, D)."""
    ids = tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def test_bad_lora_settings_are_named(tiny_model: Path):
    with pytest.raises(ValueError, match=r"model.lora.rnak: no such key"):
        lora.load_parts({"rnak": 4}, pretrained=tiny_model)
    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['to_qq'\]"):
        lora.load_parts({"target_modules": ["to_qq"]}, pretrained=tiny_model)
    with pytest.raises(ValueError, match=r"model.lora.rank=0"):
        lora.load_parts({"rank": 0}, pretrained=tiny_model)
    parts = lora.load_parts({"text_encoder": True}, pretrained=tiny_model)
    with pytest.raises(ValueError, match=r"model.train_text_encoder=true and model.lora.text_enc"):
        lora.set_text_encoder_training(parts.text_encoder, full=True)
