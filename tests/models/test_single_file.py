"""Single-file SD checkpoints (original layout): load, train from, export to, reload with diffusers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtrain.cli.export import main as export_main
from sdtrain.cli.train import train
from sdtrain.demo.tiny_single import build_flavour, make_tiny_single_file
from sdtrain.models.loader import load_parts
from sdtrain.models.single_file import save_single_file
from tests.conftest import compose_cfg, tiny_overrides

MODELS = ("unet", "vae", "text_encoder")


def assert_same_weights(a, b, dtype=None) -> None:
    for name in MODELS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            want = sa[key] if dtype is None else sa[key].to(dtype).float()
            assert torch.equal(want, sb[key].float()), f"{name}.{key}"


def configs_only(folder: Path, out: Path) -> Path:
    """A copy of a diffusers folder without its weights: what model.single_file_config needs."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


def test_folder_to_single_file_and_back_keeps_every_weight(tiny_model: Path, tmp_path: Path):
    parts = load_parts(tiny_model)
    configs = configs_only(tiny_model, tmp_path / "configs")
    for dtype, torch_dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        path = save_single_file(
            tmp_path / f"m-{dtype}.safetensors", parts.unet, parts.vae, parts.text_encoder, dtype
        )
        raw = load_file(str(path))
        assert {v.dtype for v in raw.values()} == {torch_dtype}
        # the original layout: A1111 / ComfyUI look for these names
        assert "model.diffusion_model.input_blocks.0.0.weight" in raw
        assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in raw
        assert raw["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # a 1x1 conv there
        clip = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
        assert clip in raw
        back = load_parts(path, single_file_config=configs)
        assert back.pretrained == str(path)
        assert_same_weights(parts, back, None if dtype == "fp32" else torch.float16)


@pytest.mark.parametrize("sd2", [False, True])
def test_sd_sized_unet_and_vae_keys_are_the_original_ones(sd2: bool):
    """Real SD depth (4 levels, 2 layers per block; narrow channels): the names A1111 and ComfyUI
    look up, and diffusers' own original->diffusers converter gives back every tensor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from sdtrain.models.single_file import unet_to_original, vae_to_original

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        norm_num_groups=16,
        attention_head_dim=(2, 4, 4, 4) if sd2 else 8,
        use_linear_projection=sd2,
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        norm_num_groups=8,
    )
    for model, to_original, back, prefix, names in (
        (
            unet,
            unet_to_original,
            convert_ldm_unet_checkpoint,
            "model.diffusion_model.",
            (
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.3.0.op.weight",
                "middle_block.1.proj_in.weight",
                "middle_block.2.in_layers.0.weight",
                "output_blocks.2.1.conv.weight",  # level without attention: the upsampler is .1
                "output_blocks.5.2.conv.weight",  # with attention: .2
                "output_blocks.11.0.skip_connection.weight",
                "time_embed.0.weight",
            ),
        ),
        (
            vae,
            vae_to_original,
            convert_ldm_vae_checkpoint,
            "first_stage_model.",
            (
                "encoder.down.0.downsample.conv.weight",
                "encoder.mid.attn_1.proj_out.weight",
                "decoder.up.3.upsample.conv.weight",  # the decoder's levels run reversed
                "decoder.up.0.block.0.nin_shortcut.weight",
                "decoder.norm_out.weight",
            ),
        ),
    ):
        state = model.state_dict()
        original = to_original(state, dict(model.config))
        assert not [n for n in names if prefix + n not in original]
        again = back(original, dict(model.config))
        assert again.keys() == state.keys()
        assert all(torch.equal(again[k], state[k]) for k in state)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def single_file_run(request, shards: str, tmp_path_factory):
    """A tiny SD-1 / SD-2 single file, and a 2-step training run from it."""
    flavour = request.param
    base = tmp_path_factory.mktemp(f"single-{flavour}")
    path, configs = make_tiny_single_file(base / "model", flavour)
    run = base / "run"
    overrides = tiny_overrides(path, shards, 2) + [
        f"model.single_file_config={configs}",
        "logger=none",
        "callbacks.sample_images.every_n_steps=1000",
    ]
    train(compose_cfg(run, overrides))
    return flavour, path, configs, run / "checkpoints" / "last.ckpt"


def test_sd1_and_sd2_single_files_load_and_train(single_file_run):
    flavour, path, configs, ckpt = single_file_run
    raw = load_file(str(path))
    parts = load_parts(path, single_file_config=configs)
    assert_same_weights(build_flavour(flavour), parts)  # every weight came from the file
    if flavour == "sd2":  # OpenCLIP layout: fused q/k/v; v-prediction; linear projections
        qkv = raw["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        width = parts.text_encoder.config.hidden_size
        assert qkv.shape == (3 * width, width)
        assert "cond_stage_model.model.ln_final.weight" in raw
        assert "cond_stage_model.model.positional_embedding" in raw
        assert parts.noise_scheduler.config.prediction_type == "v_prediction"
        assert parts.unet.config.use_linear_projection
        assert parts.text_encoder.config.hidden_act == "gelu"
    else:
        assert not any(k.startswith("cond_stage_model.model.") for k in raw)
        assert parts.noise_scheduler.config.prediction_type == "epsilon"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    assert saved["sdtrain"]["run"]["pretrained"] == str(path)
    assert saved["sdtrain"]["run"]["single_file_config"] == str(configs)  # export reloads with it
    trained = {k.removeprefix("unet."): v for k, v in saved["state_dict"].items()}
    start = parts.unet.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in trained.items())  # it trained


def images(pipe, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    prompt = ["a red circle", "a blue square"]
    out = pipe(prompt, num_inference_steps=3, height=32, width=32, generator=gen, output_type="np")
    return out.images


def test_export_single_file_reloads_in_diffusers_with_the_same_images(
    single_file_run, tmp_path: Path
):
    from diffusers import StableDiffusionPipeline

    flavour, _, configs, ckpt = single_file_run
    folder, file = tmp_path / "folder", tmp_path / "model.safetensors"
    moved = configs.with_name("moved")
    configs.rename(moved)
    try:  # the run recorded its configs folder; gone, export asks for it by flag
        with pytest.raises(SystemExit, match="single file .*pass --single-file-config"):
            export_main([str(ckpt), "--single-file", str(file)])
        export_main([str(ckpt), "--single-file", str(file), "--single-file-config", str(moved)])
        assert file.is_file()
    finally:
        moved.rename(configs)
    args = [str(folder), "--single-file", str(file), "--dtype", "fp32", "--overwrite"]
    export_main([str(ckpt), *args])  # over the file written above
    folder_pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    configs_out = configs_only(folder, tmp_path / "configs")  # so every weight is the file's
    file_pipe = StableDiffusionPipeline.from_single_file(
        str(file), config=str(configs_out), local_files_only=True, safety_checker=None
    )
    assert type(file_pipe.scheduler) is type(folder_pipe.scheduler)
    want = images(folder_pipe)
    assert want.std() > 0
    np.testing.assert_allclose(images(file_pipe), want, atol=1e-5)
    # EMA by default: --no-ema writes the raw U-Net, which differs after 2 steps
    raw_file = tmp_path / "raw.safetensors"
    export_main([str(ckpt), "--single-file", str(raw_file), "--no-ema"])
    ema, raw = load_file(str(file)), load_file(str(raw_file))
    assert raw[next(iter(raw))].dtype == torch.float16  # fp16 by default
    unet_keys = [k for k in ema if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(ema[k].half(), raw[k]) for k in unet_keys)
    assert all(torch.equal(ema[k].half(), raw[k]) for k in ema if k not in unet_keys)


def test_single_file_errors_name_the_key_or_file(tmp_path: Path, shards: str):
    path, configs = make_tiny_single_file(tmp_path, "sd1")
    with pytest.raises(ValueError, match="model.single_file_config is not set"):
        load_parts(path)
    state = load_file(str(path))
    for key in (
        "model.diffusion_model.out.2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        partial = tmp_path / "partial.safetensors"
        save_file({k: v for k, v in state.items() if k != key}, str(partial))
        with pytest.raises(KeyError, match="partial.safetensors: "):
            load_parts(partial, single_file_config=configs)
    (configs / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.single_file_config: .* lacks vae/config"):
        load_parts(path, single_file_config=configs)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"model.ckpt is a pickle .*can run any code"):
        load_parts(pickle, single_file_config=configs)
    # sdtrain-train refuses before building anything
    cfg = compose_cfg(tmp_path / "run", tiny_overrides(path, shards, 2) + ["logger=none"])
    with pytest.raises(ValueError, match="model.single_file_config is not set"):
        train(cfg)


def test_sd2_text_encoder_is_written_with_all_24_openclip_layers():
    """SD-2's text encoder at its real size (OpenCLIP ViT-H: 1024 wide, 23 layers in diffusers, 24
    in the original checkpoints). The file holds the 24th as SD-2 checkpoints do, with the keys
    diffusers' own loader knows to skip there (so ComfyUI, which reads all 24, finds every weight)."""
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrain.models.single_file import openclip_to_original

    config = CLIPTextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=23,
        hidden_act="gelu",
        projection_dim=1024,
    )
    with torch.device("meta"):
        state = CLIPTextModel(config).state_dict()
    original = openclip_to_original(state)
    blocks = {k.split(".")[4] for k in original if ".resblocks." in k}
    assert blocks == {str(i) for i in range(24)}
    per_block = [k for k in original if ".resblocks.0." in k]
    assert len(per_block) == 12  # fused q/k/v in and out, two norms, the MLP's two linears
    assert set(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) <= set(original)
    assert len(original) == 24 * 12 + 5  # + token and position embeddings, ln_final, projection
