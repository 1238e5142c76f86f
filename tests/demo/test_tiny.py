"""sdtrain-tiny-model: a tiny SD folder that diffusers and sdtrain both load."""

from __future__ import annotations

from pathlib import Path

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
