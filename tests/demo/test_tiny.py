"""sdtrain-tiny-model: a tiny SD folder that diffusers and sdtrain both load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from sdtrain.cli.tiny_model import main
from sdtrain.models.parts import load_frozen, load_unet


def test_cli_writes_a_folder_both_load(tmp_path: Path, capsys):
    out = tmp_path / "tiny"
    main([str(out), "--resolution", "16", "--vae-steps", "3"])
    assert f"wrote {out}" in capsys.readouterr().out
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir(), sub
    assert (out / "model_index.json").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(out)
    img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert img.images[0].size == (16, 16)

    vae, text_encoder, tokenizer, scheduler = load_frozen(out)
    unet = load_unet(out)
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert vae.config.scaling_factor != 1.0  # measured from the fitted latents
    assert scheduler.config.prediction_type == "v_prediction"
    assert tokenizer.tokenize("a yellow triangle") == ["a</w>", "yellow</w>", "triangle</w>"]
    # the slow-tokenizer files are there too, and agree with the saved tokenizer
    slow = CLIPTokenizer(str(out / "tokenizer/vocab.json"), str(out / "tokenizer/merges.txt"))
    assert slow("a blue square").input_ids == tokenizer("a blue square").input_ids


def test_cli_family_sdxl_writes_an_sdxl_folder_both_load(tmp_path: Path, capsys):
    """`--family sdxl`: the tiny SDXL, its VAE fitted as SD's; diffusers' SDXL pipeline and
    sdtrain's loader (family SDXL) both load it."""
    from diffusers import StableDiffusionXLPipeline

    from sdtrain.models.loader import load_parts

    out = tmp_path / "tiny-sdxl"
    main([str(out), "--family", "sdxl", "--resolution", "16", "--vae-steps", "3"])
    assert f"wrote {out}" in capsys.readouterr().out
    for sub in ("text_encoder_2", "tokenizer_2"):
        assert (out / sub).is_dir(), sub
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert img.images[0].size == (16, 16)
    parts = load_parts(out)
    assert parts.family.name == "sdxl"
    assert parts.vae.config.scaling_factor != 1.0  # measured from the fitted latents
    assert parts.vae.config.force_upcast  # SDXL's VAE config


def test_cli_family_sd_is_the_default_and_others_are_refused(tmp_path: Path):
    import json

    main([str(tmp_path / "sd"), "--resolution", "16", "--vae-steps", "0"])
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--family", "sd3"])
    assert not (tmp_path / "x").exists()
