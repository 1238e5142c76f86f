"""SDXL's LoRA and text-encoder training on the tiny SDXL: adapters on the U-Net and on either or
both text encoders of the pair (te1, te2), full training of either, and the exported LoRA files
(diffusers' and kohya's layouts) read by diffusers' `StableDiffusionXLPipeline.load_lora_weights`
with the effect training had. The runs are real: a few AdamW steps through the module's
training_step on random pixels and captions."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtrain.artifacts import checkpoint
from sdtrain.artifacts.export import export
from sdtrain.artifacts.export_lora import DIFFUSERS_NAME, KOHYA_NAME, export_lora
from sdtrain.demo import tiny
from sdtrain.models import lora
from sdtrain.models.loader import load_parts
from sdtrain.models.parts import tokenize
from sdtrain.training import diffusion
from sdtrain.training.ema import EMA
from sdtrain.training.module import StableDiffusionModule
from tests.conftest import cpu_trainer

PROMPT = "a red circle"
RANK, ALPHA = 4, 8.0  # scale 2: a scale dropped or applied twice shows
TOL = 2 / 255  # images as np floats in [0, 1]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    from sdtrain.demo.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", vae_steps=0)


def batches(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """`n` random SDXL batches of 2: pixels, both tokenizers' ids (B, 2, 77), sizes and crops."""
    g = torch.Generator().manual_seed(seed)
    captions = [PROMPT, "a blue square"]
    return [
        {
            "pixels": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
            "input_ids": tokenize(tokenizer, captions),
            "original_size": torch.tensor([[32, 32], [48, 40]]),
            "crop_top_left": torch.tensor([[0, 0], [8, 4]]),
        }
        for _ in range(n)
    ]


def module(parts, **kw) -> StableDiffusionModule:
    kw = {"optimizer": partial(torch.optim.AdamW, lr=3e-2), "caption_dropout": 0.0} | kw
    return StableDiffusionModule(parts, **kw)


def fit(m: StableDiffusionModule, steps: int, root: Path) -> Path:
    """`steps` optimizer steps with Lightning on CPU; the checkpoint it then saves."""
    trainer = cpu_trainer(max_steps=steps, default_root_dir=root)
    data = torch.utils.data.DataLoader(batches(m.tokenizer, steps), batch_size=None)
    trainer.fit(m, data)
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt"


def adapted(model) -> set[str]:
    """The names of the modules holding LoRA adapters."""
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def fresh(folder: Path):
    """`StableDiffusionXLPipeline.from_pretrained(folder)` sampling with DDIM, as sdtrain does."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    kw = {"num_inference_steps": 3, "guidance_scale": 1.0, "height": 32, "width": 32}
    return pipe(PROMPT, generator=g, output_type="np", **kw).images[0]


@torch.no_grad()
def encode(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's SDXL context (1, 77, D1 + D2) and pooled embedding, as the pipeline makes them."""
    context, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    return context, pooled


def step(m: StableDiffusionModule, batch: dict) -> torch.Tensor:
    """training_step without a Trainer (logging a no-op, fixed draws)."""
    m.log = lambda *a, **k: None
    m.optimizers = lambda: torch.optim.SGD(m.unet.parameters(), lr=0.0)
    m.step_generator = lambda: diffusion.step_generator(0, 0, 0, 0, "cpu")
    return m.training_step(batch, 0)


def test_sdxl_lora_trains_adapters_on_the_unet_and_both_text_encoders(sdxl: Path):
    """model.lora.text_encoder=true on SDXL: adapters on te1 and te2 as well as the U-Net; the
    gradient reaches them, nothing else trains; two optimizer groups; the checkpoint keeps them."""
    parts = lora.load_parts({"rank": RANK, "alpha": ALPHA, "text_encoder": True}, pretrained=sdxl)
    m = module(parts, text_encoder_lr=1e-2)
    m.train()
    opt = m.configure_optimizers()
    step(m, batches(m.tokenizer, 1)[0]).backward()

    named = dict(m.trainable_parameters())
    assert all(".lora_A." in n or ".lora_B." in n for n in named)
    text = [n for n in named if n.startswith("text_encoder.")]
    for prefix in ("text_encoder.te1.", "text_encoder.te2."):
        assert sum(n.startswith(prefix) for n in text) == 3 * 4 * 2  # 3 layers, q/k/v/out, A+B
    assert sum(not n.startswith("text_encoder.") for n in named) > 0  # the U-Net's
    trained = {id(p) for p in named.values()}
    frozen = [*m.unet.parameters(), *m.text_encoder.parameters(), *m.vae.parameters()]
    assert all(p.grad is None for p in frozen if id(p) not in trained)
    # B starts at zero, so B's gradient is the one that reaches each adapter first. te1's context
    # is its penultimate layer's (SDXL's): its last layer's adapters get none, as in SDXL itself.
    last = f"te1.encoder.layers.{m.text_encoder.te1.config.num_hidden_layers - 1}."
    for n, p in named.items():
        if ".lora_B." not in n:
            continue
        if n.startswith(f"text_encoder.{last}"):
            assert p.grad is None, n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert [g["name"] for g in opt.param_groups] == ["unet", "text_encoder"]
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(named[n]) for n in text}
    keys = lora.checkpoint_keys(m.unet, m.text_encoder)
    assert {k for k in keys if k.startswith("text_encoder.")} == set(text)
    assert lora.describe(m.unet, m.text_encoder)["text_encoder"] is True


def test_one_text_encoder_of_the_pair_trains_alone(sdxl: Path):
    """te1 / te2 pick one encoder for LoRA (model.lora.text_encoder) or full training
    (model.train_text_encoder); the run metadata records the pick and export rebuilds it."""
    parts = lora.load_parts({"rank": RANK, "text_encoder": "te2"}, pretrained=sdxl)
    pair = parts.text_encoder
    assert not adapted(pair.te1) and adapted(pair.te2)
    recorded = lora.describe(parts.unet, pair)
    assert recorded["text_encoder"] == "te2"
    rebuilt = lora.add_recorded(load_parts(sdxl), recorded)
    assert adapted(rebuilt.text_encoder) == adapted(pair) and adapted(rebuilt.unet)

    # full te1 beside LoRA on te2: te1 whole and te2's adapters train, nothing else of the pair
    assert lora.set_text_encoder_training(pair, "te1") is True
    trains = {n for n, p in pair.named_parameters() if p.requires_grad}
    te1 = {f"te1.{n}" for n, _ in pair.te1.named_parameters()}
    assert trains == te1 | {f"te2.{n}" for n, _ in pair.te2.named_parameters() if ".lora_" in n}
    with pytest.raises(ValueError, match=r"model.train_text_encoder=true and model.lora.text_e"):
        lora.set_text_encoder_training(pair, True)

    plain = load_parts(sdxl).text_encoder
    assert lora.set_text_encoder_training(plain, "te2") is True
    assert not any(p.requires_grad for p in plain.te1.parameters())
    assert all(p.requires_grad for p in plain.te2.parameters())
    assert lora.set_text_encoder_training(plain, True) is True
    assert all(p.requires_grad for p in plain.parameters())
    assert lora.set_text_encoder_training(plain, False) is False
    assert not any(p.requires_grad for p in plain.parameters())


def test_bad_text_encoder_picks_are_named(sdxl: Path):
    with pytest.raises(ValueError, match=r"model.lora.text_encoder='te3': takes true, false, te1"):
        lora.load_parts({"text_encoder": "te3"}, pretrained=sdxl)
    pair = lora.load_parts({"text_encoder": "te1"}, pretrained=sdxl).text_encoder
    with pytest.raises(ValueError, match=r"model.train_text_encoder='both': takes true, false"):
        lora.set_text_encoder_training(pair, "both")
    want = r"model.train_text_encoder=te1 and model.lora.text_encoder=te1: pick one"
    with pytest.raises(ValueError, match=want):
        lora.set_text_encoder_training(pair, "te1")
    sd = tiny.build_parts(32)  # one text encoder: te1 / te2 mean nothing
    with pytest.raises(ValueError, match=r"model.train_text_encoder=te1: te1 and te2 name one"):
        lora.set_text_encoder_training(sd.text_encoder, "te1")
    with pytest.raises(ValueError, match=r"model.lora.text_encoder=te2: .* set true or false"):
        lora.add_lora(sd, text_encoder="te2")


def test_sdxl_full_training_of_one_text_encoder_exports(sdxl: Path, tmp_path: Path):
    """model.train_text_encoder=te2: te2 trains (its own group), te1 stays; the checkpoint and
    its EMA keep te2's weights only, and the exported folder's text_encoder_2 holds them."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = load_parts(sdxl)
    base = {k: v.clone() for k, v in parts.text_encoder.state_dict().items()}
    m = module(parts, train_text_encoder="te2", ema=EMA(decay=0.5, warmup=False))
    ckpt_path = fit(m, 2, tmp_path)
    now = m.text_encoder.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items() if k.startswith("te1."))
    assert any(not torch.equal(now[k], v) for k, v in base.items() if k.startswith("te2."))
    ckpt = checkpoint.load(ckpt_path)
    te2 = {f"text_encoder.{k}" for k in now if k.startswith("te2.")}
    assert {k for k in ckpt["state_dict"] if k.startswith("text_encoder.")} == te2
    ema = checkpoint.text_encoder_weights(ckpt, ema=True)
    assert {f"text_encoder.{k}" for k in ema} == te2

    export(ckpt_path, tmp_path / "out")
    two = CLIPTextModelWithProjection.from_pretrained(tmp_path / "out" / "text_encoder_2")
    got = two.state_dict()
    assert all(torch.equal(got[k.removeprefix("te2.")], v) for k, v in ema.items())
    one = CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder").state_dict()
    assert all(torch.equal(one[k.removeprefix("te1.")], v) for k, v in base.items() if "te1." in k)


@pytest.fixture(scope="module")
def lora_run(sdxl: Path, tmp_path_factory):
    """LoRA on the U-Net and both text encoders (rank 4, alpha 8), 4 steps, EMA; exported with
    --lora and merged."""
    root = tmp_path_factory.mktemp("sdxl-lora")
    parts = lora.load_parts({"rank": RANK, "alpha": ALPHA, "text_encoder": True}, pretrained=sdxl)
    m = module(parts, ema=EMA(decay=0.5, warmup=False))
    ckpt_path = fit(m, 4, root)
    export_lora(ckpt_path, root / "lora")
    export(ckpt_path, root / "fused")
    m.eval()
    return m, root


def test_sdxl_lora_files_hold_the_layouts_readers_know(lora_run):
    """diffusers' file: `unet.`, `text_encoder.` and `text_encoder_2.` keys, as
    `StableDiffusionXLPipeline.save_lora_weights` writes them; kohya's: the sgm U-Net's names
    (`lora_unet_input_blocks_…`, `middle_block`, `output_blocks`), `lora_te1_` and `lora_te2_`,
    each with its alpha (= rank: the scale is folded into up)."""
    _, root = lora_run
    ours = load_file(root / "lora" / DIFFUSERS_NAME)
    assert {k.split(".")[0] for k in ours} == {"unet", "text_encoder", "text_encoder_2"}
    assert (
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"
        in ours
    )
    kohya = load_file(root / "lora" / KOHYA_NAME)
    heads = {k.split("_")[0] + "_" + k.split("_")[1] for k in kohya}
    assert heads == {"lora_unet", "lora_te1", "lora_te2"}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj.lora_up.weight" in kohya
    unet = {k.split(".")[0] for k in kohya if k.startswith("lora_unet_")}
    assert any(k.startswith("lora_unet_input_blocks_") for k in unet)
    assert any(k.startswith("lora_unet_middle_block_1_transformer_blocks_") for k in unet)
    assert any(k.startswith("lora_unet_output_blocks_") for k in unet)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in unet)
    alphas = [v.item() for k, v in kohya.items() if k.endswith(".alpha")]
    assert len(alphas) * 3 == len(kohya) and set(alphas) == {RANK}


def test_sdxl_lora_files_load_in_diffusers_with_the_trained_effect(lora_run, sdxl: Path):
    """Each file, read by `load_lora_weights` into a fresh `StableDiffusionXLPipeline` of the tiny
    folder, adapts the same modules of the U-Net and both text encoders as training did; the
    pipeline then encodes the prompt as the trained model does and draws its image (EMA weights),
    which is also the merged export's; the base pipeline's differs."""
    m, root = lora_run
    with m.ema_weights():
        pipe = m.pipeline("ddim")
        trained, trained_text = image(pipe), encode(pipe)
    base = fresh(sdxl)
    assert np.abs(image(base) - trained).mean() > 0.01  # training changed the image measurably
    assert all((a - b).abs().max() > 0.1 for a, b in zip(encode(base), trained_text, strict=True))
    fused = image(fresh(root / "fused"))
    np.testing.assert_allclose(fused, trained, atol=TOL)

    want = {
        "unet": adapted(m.unet),
        "text_encoder": adapted(m.text_encoder.te1),
        "text_encoder_2": adapted(m.text_encoder.te2),
    }
    assert all(want.values())
    for source in (root / "lora", root / "lora" / KOHYA_NAME):
        pipe = fresh(sdxl)
        pipe.load_lora_weights(str(source))
        assert {name: adapted(getattr(pipe, name)) for name in want} == want, source
        for got, ref in zip(encode(pipe), trained_text, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(image(pipe), trained, atol=TOL, err_msg=str(source))
        np.testing.assert_allclose(image(pipe), fused, atol=TOL, err_msg=str(source))


# every kind of U-Net layer peft adapts, beyond the attention projections: kohya's sgm names for
# ResNets (in_layers, emb_layers, out_layers), samplers (op), conv_in / conv_out and the time and
# size embeddings must map back onto the same modules
EVERY_LAYER = [
    *lora.UNET_TARGETS,
    *("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj"),
    *("conv_in", "conv_out", "conv", "linear_1", "linear_2"),
]


def test_sdxl_lora_on_every_unet_layer_loads_from_both_files(sdxl: Path, tmp_path: Path):
    """Adapters beyond attention: both files give diffusers' U-Net the trained U-Net's output. (The
    diffusers file keeps peft's names then: converting only the attention's to diffusers' names
    made a mix whose attention adapters diffusers' loader dropped.)"""
    parts = lora.load_parts({"rank": RANK, "target_modules": EVERY_LAYER}, pretrained=sdxl)
    m = module(parts, ema=None)
    export_lora(fit(m, 2, tmp_path), tmp_path / "lora", ema=False)
    g = torch.Generator().manual_seed(1)
    cfg = m.unet.config
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    extra = {
        "text_embeds": torch.randn(2, m.text_encoder.pooled_dim, generator=g),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32], [48, 40, 8, 4, 32, 32]]),
    }
    kw = {
        "encoder_hidden_states": torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
        "added_cond_kwargs": extra,
    }
    with torch.no_grad():
        want = m.unet.eval()(x, t, **kw).sample
        before = fresh(sdxl).unet(x, t, **kw).sample
    assert (before - want).abs().max() > 1e-2
    for source in (tmp_path / "lora", tmp_path / "lora" / KOHYA_NAME):
        pipe = fresh(sdxl)
        pipe.load_lora_weights(str(source))
        assert adapted(pipe.unet) == adapted(m.unet), source
        with torch.no_grad():
            got = pipe.unet(x, t, **kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(source))
