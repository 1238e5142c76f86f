"""Single-file SDXL checkpoints (Stability's original layout): written by sdtrain, read by
diffusers' own converter (`StableDiffusionXLPipeline.from_single_file`), loaded by sdtrain, and
exported from a training checkpoint."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from scripts.shaped_models import SDXL_UNET
from sdtrain.cli.export import main as export_main
from sdtrain.demo.tiny_sdxl import make_tiny_sdxl
from sdtrain.models.loader import load_parts
from sdtrain.models.sdxl import SDXL, TextEncoderPair, TokenizerPair
from sdtrain.models.single_file_sdxl import save_single_file
from tests.conftest import cpu_trainer
from tests.models.test_single_file import configs_only

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the diffusers pipeline's
PREFIXES = (  # SDXL's original top-level names
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.1.model.",
)
TOLERANCE = 2 / 255  # images of an fp16 file against the fp32 folder's


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL folder (random VAE: these tests compare images, never judge them)."""
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", vae_steps=0)


def pipeline_from_file(file: Path, configs: Path):
    """diffusers alone: the single file with a folder of configs and tokenizers, no weights."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(
        str(file), config=str(configs), local_files_only=True, torch_dtype=torch.float32
    )


def images(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    prompt = ["a red circle", "a blue square"]
    out = pipe(prompt, num_inference_steps=3, height=32, width=32, generator=gen, output_type="np")
    return out.images


def models_of(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in MODELS}


def assert_same_weights(a: dict, b: dict, dtype: torch.dtype | None = None) -> None:
    """Models of `b` hold the weights of `a` (rounded to `dtype` first, if given)."""
    for name in MODELS:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key, want in sa.items():
            want = want if dtype is None else want.to(dtype).float()
            assert not sb[key].is_meta, f"{name}.{key} was not read"
            assert torch.equal(want, sb[key].float()), f"{name}.{key}"


@pytest.mark.slow  # SDXL pipelines drawing images: CI runs it (keeps the default suite near 10 min)
def test_diffusers_reads_every_tensor_and_draws_what_the_folder_draws(sdxl: Path, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = StableDiffusionXLPipeline.from_pretrained(sdxl)
    parts = load_parts(sdxl)
    file = save_single_file(tmp_path / "m.safetensors", parts.unet, parts.vae, parts.text_encoder)
    raw = load_file(str(file))
    assert {v.dtype for v in raw.values()} == {torch.float16}  # the default
    assert not [k for k in raw if not k.startswith(PREFIXES)]
    te2 = "conditioner.embedders.1.model."
    width = parts.text_encoder.te2.config.hidden_size
    assert raw[te2 + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert "model.diffusion_model.label_emb.0.0.weight" in raw  # add_embedding, ComfyUI's name
    pipe = pipeline_from_file(file, configs_only(sdxl, tmp_path / "configs"))
    # every weight diffusers' converter builds came from the file (none left on meta, none
    # different), text_projection included (diffusers transposes OpenCLIP's x @ P back) ...
    assert_same_weights(models_of(folder), models_of(pipe), torch.float16)
    # ... and the file holds nothing else: as many numbers as the four models (fused q/k/v
    # split, the projection transposed, the VAE's 1x1 convs made linear: the same count)
    held = sum(v.numel() for v in raw.values())
    read = sum(v.numel() for m in models_of(pipe).values() for v in m.state_dict().values())
    assert held == read
    want = images(folder)
    assert want.std() > 0
    assert np.abs(images(pipe) - want).max() <= TOLERANCE


def test_sdtrain_loads_an_sdxl_single_file_as_the_folder(sdxl: Path, tmp_path: Path):
    folder = load_parts(sdxl)
    file = save_single_file(
        tmp_path / "m.safetensors", folder.unet, folder.vae, folder.text_encoder, "fp32"
    )
    configs = configs_only(sdxl, tmp_path / "configs")
    parts = load_parts(file, single_file_config=configs)
    assert parts.family is SDXL
    assert parts.pretrained == str(file) and parts.single_file_config == str(configs)
    assert isinstance(parts.text_encoder, TextEncoderPair)
    assert isinstance(parts.tokenizer, TokenizerPair)
    assert parts.tokenizer.two.pad_token == folder.tokenizer.two.pad_token == "!"
    for name in ("unet", "vae", "text_encoder"):  # the pair: te1.* and te2.*
        want, got = getattr(folder, name).state_dict(), getattr(parts, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert parts.noise_scheduler.config == folder.noise_scheduler.config

    # a file without the second encoder's projection: refused, naming the file
    raw = load_file(str(file))
    del raw["conditioner.embedders.1.model.text_projection"]
    cut = tmp_path / "cut.safetensors"
    save_file(raw, str(cut))
    with pytest.raises(KeyError, match="cut.safetensors"):
        load_parts(cut, single_file_config=configs)
    # a configs folder without SDXL's second encoder: named before anything loads
    shutil.rmtree(configs / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2/config.json"):
        load_parts(file, single_file_config=configs)


def test_sdxl_sized_keys_are_the_ones_diffusers_reads():
    """Real SDXL shapes (3 levels, 2 layers per block, 10 transformer layers deep down; CLIP ViT-L
    and OpenCLIP ViT-bigG), on the meta device: the names Stability's SDXL files hold, diffusers
    tells SDXL base from them alone (no configs), and its converters give back every weight."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtrain.models.single_file_sdxl import OPENCLIP_PREFIX, to_original

    def clip(width: int, layers: int, act: str) -> CLIPTextConfig:
        heads, proj = width // 64, width
        return CLIPTextConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            hidden_act=act,
            projection_dim=proj,
        )

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)  # stable-diffusion-xl-base-1.0's config
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        )
        te1 = CLIPTextModel(clip(768, 12, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(clip(1280, 32, "gelu"))
    original = to_original(unet, vae, TextEncoderPair(te1, te2))
    names = {
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (
            1280,
            2048,
        ),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (
            768,
            3072,
        ),
        OPENCLIP_PREFIX + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        OPENCLIP_PREFIX + "transformer.resblocks.31.mlp.c_proj.bias": (1280,),
        OPENCLIP_PREFIX + "positional_embedding": (77, 1280),
        OPENCLIP_PREFIX + "ln_final.weight": (1280,),
        OPENCLIP_PREFIX + "text_projection": (1280, 1280),
    }
    assert {k: tuple(original[k].shape) for k in names if k in original} == names
    assert not [k for k in original if k.startswith(OPENCLIP_PREFIX + "transformer.resblocks.32")]
    assert infer_diffusers_model_type(original) == "xl_base"
    for model, back in (
        (unet, lambda: convert_ldm_unet_checkpoint(original, dict(unet.config))),
        (te2, lambda: convert_open_clip_checkpoint(te2, original, prefix=OPENCLIP_PREFIX)),
    ):
        state, again = model.state_dict(), back()
        assert again.keys() == state.keys()
        assert all(again[k].shape == state[k].shape for k in state)


# ------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def checkpoint(sdxl: Path, tmp_path_factory) -> Path:
    """A 2-step SDXL training checkpoint (with EMA) from sdtrain's module and Lightning, on
    batches made here: pixels, both tokenizers' ids and each image's size and crop."""
    from torch.utils.data import DataLoader

    from sdtrain.datamodules import batch as B
    from sdtrain.models.parts import tokenize
    from sdtrain.training.ema import EMA
    from sdtrain.training.module import StableDiffusionModule

    parts = load_parts(sdxl)
    module = StableDiffusionModule(
        parts, optimizer=partial(torch.optim.AdamW, lr=1e-2), ema=EMA(decay=0.5, warmup=False)
    )
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle", "a blue square"]
    batches = [
        {
            B.PIXELS: torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
            B.INPUT_IDS: tokenize(parts.tokenizer, captions),  # (2, 2, 77)
            B.ORIGINAL_SIZE: torch.tensor([[32, 32], [48, 40]]),
            B.CROP_TOP_LEFT: torch.tensor([[0, 0], [8, 4]]),
        }
        for _ in range(2)
    ]
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    out = tmp_path_factory.mktemp("sdxl-run") / "last.ckpt"
    trainer.save_checkpoint(out)
    return out


@pytest.mark.slow  # SDXL pipelines drawing images: CI runs it (keeps the default suite near 10 min)
def test_export_of_an_sdxl_checkpoint_loads_in_diffusers(
    checkpoint: Path, sdxl: Path, tmp_path: Path
):
    from diffusers import StableDiffusionXLPipeline

    folder, file = tmp_path / "folder", tmp_path / "model.safetensors"
    export_main([str(checkpoint), str(folder), "--single-file", str(file)])
    exported = StableDiffusionXLPipeline.from_pretrained(folder)  # diffusers alone
    # the U-Net holds the checkpoint's EMA weights (read here with torch alone), which trained
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    shadow = saved["sdtrain"]["ema"]["shadow"]
    got = exported.unet.state_dict()
    assert shadow.keys() == got.keys()
    assert all(torch.equal(shadow[k].float(), got[k]) for k in shadow)
    start = StableDiffusionXLPipeline.from_pretrained(sdxl)
    assert any(not torch.equal(v, got[k]) for k, v in start.unet.state_dict().items())
    for name in ("vae", "text_encoder", "text_encoder_2"):  # frozen: the model folder's
        want, have = getattr(start, name).state_dict(), getattr(exported, name).state_dict()
        assert all(torch.equal(want[k], have[k]) for k in want), name
    # the single file (fp16, the default) draws what the folder draws
    pipe = pipeline_from_file(file, configs_only(folder, tmp_path / "configs"))
    assert_same_weights(models_of(exported), models_of(pipe), torch.float16)
    want = images(exported)
    assert want.std() > 0
    assert np.abs(images(pipe) - want).max() <= TOLERANCE
