"""The LoRA family (`model.lora.type` locon / loha / lokr, `model.lora.dora`) on the tiny SD model:
a few real AdamW steps, then the exported kohya / LyCORIS file rebuilt into the base model by the
published formulas (`tests/models/lora_formulas.py`, written apart from sdtrain and peft) gives the
trained U-Net's and text encoder's outputs; where diffusers reads the type (LoRA, LoCon, DoRA),
`pipe.load_lora_weights` on the export gives them too. Every run has alpha != rank, so a scale
dropped or applied twice shows."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtrain.artifacts import checkpoint
from sdtrain.artifacts.export import export
from sdtrain.artifacts.export_lora import DIFFUSERS_NAME, KOHYA_NAME, export_lora
from sdtrain.artifacts.sampling import build_pipeline
from sdtrain.models import lora
from sdtrain.models.loader import load_parts
from sdtrain.models.lora_family import LOCON_TARGETS
from sdtrain.models.parts import tokenize
from sdtrain.models.sdxl import TextEncoderPair
from sdtrain.training.module import StableDiffusionModule
from tests.conftest import cpu_trainer
from tests.models import lora_formulas as formulas

HADA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
CONV = {"conv_target_modules": list(LOCON_TARGETS)}
# name -> (model.lora, the tensor names the kohya file holds for its modules)
VARIANTS = {
    "locon": ({"type": "locon"}, {"lora_down.weight", "lora_up.weight", "alpha"}),
    "dora": ({"dora": True}, {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}),
    "locon-dora": (
        {"type": "locon", "dora": True},
        {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    ),
    "loha": ({"type": "loha", **CONV}, HADA),
    "loha-cp": (
        {"type": "loha", "use_effective_conv2d": True, **CONV},
        {*HADA, "hada_t1", "hada_t2"},
    ),
    "lokr": ({"type": "lokr", **CONV}, {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "lokr-both": (
        {"type": "lokr", "rank": 2, "decompose_both": True, "decompose_factor": 16, **CONV},
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
    ),
    "lokr-cp": (
        {"type": "lokr", "rank": 2, "use_effective_conv2d": True, **CONV},
        {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
    ),
}
DIFFUSERS_READS = ("locon", "dora", "locon-dora")


def batches(tokenizer, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = tokenize(tokenizer, ["a red circle", "a blue square"])
    return [{"pixels": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "input_ids": ids}] * n


def fit(m: StableDiffusionModule, steps: int, root: Path) -> Path:
    """`steps` AdamW steps with Lightning on the CPU; the checkpoint it then saves."""
    trainer = cpu_trainer(max_steps=steps, default_root_dir=root)
    trainer.fit(m, torch.utils.data.DataLoader(batches(m.tokenizer, steps), batch_size=None))
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt"


def train(model: Path, settings: dict, root: Path) -> StableDiffusionModule:
    """model.lora `settings` (rank 4, alpha 8: scale 2 unless given) on the U-Net and the text
    encoder, 3 steps; exported (raw weights) into `root / "lora"`."""
    settings = {"rank": 4, "alpha": 8.0, "text_encoder": True} | settings
    parts = lora.load_parts(settings, pretrained=model)
    opt = partial(torch.optim.AdamW, lr=3e-2)
    m = StableDiffusionModule(parts, optimizer=opt, caption_dropout=0.0, text_encoder_lr=3e-2)
    export_lora(fit(m, 3, root), root / "lora", ema=False)
    return m.eval()


def inputs(unet) -> tuple:
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), c


@torch.no_grad()
def outputs(unet, text_encoder, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net's noise prediction for fixed inputs and the text encoder's context of a prompt."""
    x, t, c = inputs(unet)
    ids = tokenize(tokenizer, ["a red circle"])
    return unet(x, t, encoder_hidden_states=c).sample, text_encoder(ids)[0]


def kohya_table(model, prefix: str, text_model: bool = False) -> dict[str, str]:
    """kohya name -> module path of every module of `model` (kohya-ss: `.` -> `_`; CLIP's under
    `text_model.` as readers know it)."""
    lead = "text_model." if text_model and not hasattr(model, "text_model") else ""
    return {f"{prefix}{lead}{n}".replace(".", "_"): n for n, _ in model.named_modules() if n}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_type_exported_and_rebuilt_gives_the_trained_outputs(
    name: str, tiny_model: Path, tmp_path: Path
):
    """The kohya file holds the type's tensors for every adapted module (convolutions too where
    asked) under kohya's names; the base model with the formulas' weights gives the trained U-Net's
    noise prediction and the trained text encoder's context; diffusers' file, for the types it
    reads, gives them through `load_lora_weights`; the plain export (adapters merged) too."""
    settings, tensors = VARIANTS[name]
    m = train(tiny_model, settings, tmp_path)
    want = outputs(m.unet, m.text_encoder, m.tokenizer)
    recorded = checkpoint.run_info(checkpoint.load(tmp_path / "last.ckpt"))["lora"]
    assert recorded["type"] == settings.get("type", "lora")

    file = load_file(tmp_path / "lora" / KOHYA_NAME)
    modules = formulas.by_module(file)
    base = load_parts(tiny_model)
    before = outputs(base.unet, base.text_encoder, base.tokenizer)
    unet = {k: v for k, v in modules.items() if k.startswith("lora_unet_")}
    text = {k: v for k, v in modules.items() if k.startswith("lora_te_")}
    assert len(unet) + len(text) == len(modules)
    # one entry per adapted module of each model, under the name of that module
    assert {formulas_name(p, "lora_unet_") for p in lora_paths(m.unet)} == set(unet)
    text_paths = lora_paths(m.text_encoder)
    assert {formulas_name(f"text_model.{p}", "lora_te_") for p in text_paths} == set(text)
    assert set().union(*modules.values()) == tensors  # the type's tensors, and only those
    kinds = {type(m.unet.get_submodule(n).get_base_layer()).__name__ for n in lora_paths(m.unet)}
    assert ("Conv2d" in kinds) == (name != "dora")  # convolutions adapted where asked

    formulas.apply(base.unet, unet, kohya_table(base.unet, "lora_unet_"))
    formulas.apply(base.text_encoder, text, kohya_table(base.text_encoder, "lora_te_", True))
    got = outputs(base.unet, base.text_encoder, base.tokenizer)
    for g, w, b in zip(got, want, before, strict=True):
        assert (w - b).abs().max() > 1e-3  # training changed the outputs measurably
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "lora" / DIFFUSERS_NAME).exists() == (name in DIFFUSERS_READS)
    if name in DIFFUSERS_READS:  # diffusers reads its own file into the base pipeline
        p = load_parts(tiny_model)
        pipe = build_pipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, p.noise_scheduler, "ddim")
        pipe.load_lora_weights(str(tmp_path / "lora"))
        got = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

    export(tmp_path / "last.ckpt", tmp_path / "fused", ema=False)  # no --lora: merged weights
    fused = load_parts(tmp_path / "fused")
    assert not lora.has_adapter(fused.unet) and not lora.has_adapter(fused.text_encoder)
    got = outputs(fused.unet, fused.text_encoder, fused.tokenizer)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def formulas_name(path: str, prefix: str) -> str:
    return f"{prefix}{path}".replace(".", "_")


def lora_paths(model) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, mod in model.named_modules() if isinstance(mod, BaseTunerLayer)]


def test_unsupported_combinations_are_named(tiny_model: Path):
    cases = {
        "type": ({"type": "glora"}, r"model.lora.type='glora': takes one of lora, locon, loha"),
        "dora": (
            {"type": "loha", "dora": True},
            r"model.lora.dora=True with model.lora.type=loha: peft has DoRA for LoRA only",
        ),
        "dropout": (
            {"type": "lokr", "dropout": 0.1},
            r"model.lora.dropout=0.1 with model.lora.type=lokr: .* use rank_dropout",
        ),
        "conv": (
            {"conv_target_modules": ["conv1"]},
            r"model.lora.conv_target_modules=\['conv1'\] with model.lora.type=lora: .* type locon",
        ),
        "lokr": (
            {"type": "loha", "decompose_factor": 4},
            r"model.lora.decompose_factor=4 with model.lora.type=loha: decompose_factor is for type lokr",
        ),
        "range": ({"type": "loha", "rank_dropout": 1.5}, r"model.lora.rank_dropout=1.5 is not in"),
    }
    for settings, message in cases.values():
        with pytest.raises(ValueError, match=message):
            lora.load_parts(settings, pretrained=tiny_model)
    # null options are the type's defaults, and the "off" value of another type's key is no error
    parts = lora.load_parts(
        {"type": "loha", "dropout": 0.0, "dora": False, "decompose_factor": None},
        pretrained=tiny_model,
    )
    assert lora.describe(parts.unet, parts.text_encoder)["type"] == "loha"


@pytest.mark.parametrize(
    "settings",
    [
        {"type": "loha", **CONV},
        {"type": "lokr", "rank": 2, **CONV},
        {"type": "locon", "dora": True},
    ],
    ids=["loha", "lokr", "locon-dora"],
)
def test_sdxl_types_rebuilt_from_the_kohya_file(settings: dict, tiny_sdxl: Path, tmp_path: Path):
    """On SDXL, with adapters on the U-Net and both text encoders: the kohya file names the U-Net's
    modules as generative-models' U-Net does (`lora_unet_input_blocks_…`) and the encoders
    `lora_te1_` / `lora_te2_`; rebuilt by the formulas it gives the trained outputs, and diffusers'
    file (DoRA) read by `StableDiffusionXLPipeline.load_lora_weights` gives them too."""
    from sdtrain.models.single_file import UNET_PREFIX, unet_to_original
    from tests.models.test_lora_sdxl import batches as sdxl_batches
    from tests.models.test_lora_sdxl import fresh

    settings = {"rank": 4, "alpha": 8.0, "text_encoder": True} | settings
    m = StableDiffusionModule(
        lora.load_parts(settings, pretrained=tiny_sdxl),
        optimizer=partial(torch.optim.AdamW, lr=3e-2),
        caption_dropout=0.0,
    )
    trainer = cpu_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(m, torch.utils.data.DataLoader(sdxl_batches(m.tokenizer, 2), batch_size=None))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    export_lora(tmp_path / "last.ckpt", tmp_path / "lora", ema=False)
    want = sdxl_outputs(m.eval().unet, m.text_encoder)

    modules = formulas.by_module(load_file(tmp_path / "lora" / KOHYA_NAME))
    assert {k.split("_")[1] for k in modules} == {"unet", "te1", "te2"}
    assert not any("down_blocks" in k or "up_blocks" in k for k in modules)
    base = load_parts(tiny_sdxl)
    before = sdxl_outputs(base.unet, base.text_encoder)
    sgm = {}
    for path, layer in base.unet.named_modules():
        if isinstance(getattr(layer, "weight", None), torch.Tensor):
            (key,) = unet_to_original({f"{path}.weight": layer.weight}, base.unet.config)
            sgm[
                f"lora_unet_{key.removeprefix(UNET_PREFIX).removesuffix('.weight')}".replace(
                    ".", "_"
                )
            ] = path
    pair = base.text_encoder
    for part, model, table in (
        ("lora_unet_", base.unet, sgm),
        ("lora_te1_", pair.te1, kohya_table(pair.te1, "lora_te1_", True)),
        ("lora_te2_", pair.te2, kohya_table(pair.te2, "lora_te2_", True)),
    ):
        formulas.apply(model, {k: v for k, v in modules.items() if k.startswith(part)}, table)
    got = sdxl_outputs(base.unet, base.text_encoder)
    for g, w, b in zip(got, want, before, strict=True):
        assert (w - b).abs().max() > 1e-3
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

    if settings.get("dora"):
        pipe = fresh(tiny_sdxl)
        pipe.load_lora_weights(str(tmp_path / "lora"))
        got = sdxl_outputs(pipe.unet, TextEncoderPair(pipe.text_encoder, pipe.text_encoder_2))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def sdxl_outputs(unet, pair) -> tuple[torch.Tensor, ...]:
    """The SDXL U-Net's noise prediction for fixed inputs, and each text encoder's last hidden
    states for fixed token ids."""
    x, t, c = inputs(unet)
    g = torch.Generator().manual_seed(2)
    cond = {
        "text_embeds": torch.randn(2, pair.te2.config.projection_dim, generator=g),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32], [48, 40, 8, 4, 32, 32]]),
    }
    ids = torch.randint(0, 40, (1, 77), generator=g)
    return (
        unet(x, t, encoder_hidden_states=c, added_cond_kwargs=cond).sample,
        pair.te1(ids).last_hidden_state,
        pair.te2(ids).last_hidden_state,
    )


def test_lokr_run_from_the_config_resumes_and_exports_both_ways(
    tiny_model: Path, shards: str, tmp_path: Path
):
    """`sdtrain-train experiment=lora model.lora.type=lokr ...` on shards resumes with its LoKr
    factors as saved; `sdtrain-export --lora` writes the kohya file alone (diffusers reads no SD
    LoKr) and the plain export merges the adapters: the merged U-Net's weights are the formulas'
    of the kohya file (EMA weights both)."""
    from diffusers import UNet2DConditionModel

    from sdtrain.cli.export import main as export_main
    from tests.conftest import tiny_overrides
    from tests.models.test_lora import CPU, run

    lokr = ["model.lora.type=lokr", "model.lora.conv_target_modules=[conv1,conv2]"]
    lokr += ["model.lora.decompose_factor=4", "model.lora.rank=2", "model.lora.alpha=6"]
    run(tmp_path, tiny_overrides(tiny_model, shards, 2) + CPU + lokr)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = checkpoint.load(ckpt)
    recorded = checkpoint.run_info(saved)["lora"]
    assert (recorded["type"], recorded["decompose_factor"], recorded["alpha"]) == ("lokr", 4, 6.0)
    assert saved["state_dict"] and all(".lokr_" in k for k in saved["state_dict"])
    resumed = run(
        tmp_path / "resumed",
        tiny_overrides(tiny_model, shards, 3) + CPU + lokr + [f"ckpt_path={ckpt}"],
    )
    for key, value in saved["state_dict"].items():
        assert torch.equal(resumed.start_unet[key.removeprefix("unet.")], value), key

    export_main([str(ckpt), str(tmp_path / "lora"), "--lora"])
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [KOHYA_NAME]
    modules = formulas.by_module(load_file(tmp_path / "lora" / KOHYA_NAME))
    assert any(k.endswith("_conv1") for k in modules) and all(
        "lokr_w1" in t for t in modules.values()
    )
    export_main([str(ckpt), str(tmp_path / "fused")])
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "fused" / "unet").state_dict()
    base = load_parts(tiny_model).unet
    table = kohya_table(base, "lora_unet_")
    moved = 0
    for name, tensors in modules.items():
        weight = f"{table[name]}.weight"
        want = formulas.merged(base.state_dict()[weight], tensors)
        torch.testing.assert_close(fused[weight].double(), want, rtol=0, atol=1e-6)
        moved += not torch.equal(fused[weight], base.state_dict()[weight])
    assert moved == len(modules)
