"""SDXL's training step as published, checked against diffusers' own StableDiffusionXLPipeline
(`encode_prompt`, `_get_add_time_ids`), not against numbers sdtrain produced."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdtrain.datamodules import batch as B
from sdtrain.demo.tiny_sdxl import make_tiny_sdxl
from sdtrain.models.families import detect
from sdtrain.models.loader import load_parts
from sdtrain.models.parts import tokenize
from sdtrain.models.sdxl import SDXL, time_ids
from sdtrain.training import diffusion
from sdtrain.training.module import StableDiffusionModule

CAPTIONS = ["a red circle", "a blue square of the photo"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("xl") / "tiny-sdxl", vae_steps=0)


@pytest.fixture(scope="module")
def pipe(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


def module(folder: Path, **kw) -> StableDiffusionModule:
    m = StableDiffusionModule(load_parts(folder), optimizer=partial(torch.optim.AdamW), **kw)
    m.log = lambda *a, **k: None
    m.optimizers = lambda: torch.optim.SGD(m.unet.parameters(), lr=0.0)
    m.step_generator = lambda: diffusion.step_generator(0, 0, 0, 0, "cpu")
    return m.eval()


def batch(m: StableDiffusionModule) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        B.PIXELS: torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        B.INPUT_IDS: tokenize(m.tokenizer, CAPTIONS),
        B.ORIGINAL_SIZE: torch.tensor([[700, 512], [32, 48]]),
        B.CROP_TOP_LEFT: torch.tensor([[5, 0], [0, 8]]),
    }


def test_an_sdxl_folder_is_the_sdxl_family(folder: Path):
    assert detect(folder) is SDXL
    parts = load_parts(folder)
    assert parts.family is SDXL and type(parts.text_encoder).__name__ == "TextEncoderPair"


def test_the_text_conditioning_is_diffusers_encode_prompt(folder: Path, pipe):
    """Both encoders' penultimate hidden states concatenated, the second's pooled projection."""
    m = module(folder)
    with torch.no_grad():
        ours = m.encode_text(tokenize(m.tokenizer, CAPTIONS))
        embeds, _, pooled, _ = pipe.encode_prompt(
            CAPTIONS, device="cpu", do_classifier_free_guidance=False
        )
    torch.testing.assert_close(ours["context"], embeds.float())
    torch.testing.assert_close(ours["pooled"], pooled.float())


def test_a_dropped_caption_is_what_the_pipeline_samples_unconditionally(folder: Path, pipe):
    """SDXL trained with zeroed conditioning (generative-models' ucg_rate); its pipeline samples
    with zeros for the empty prompt (force_zeros_for_empty_prompt)."""
    m = module(folder)
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt(
            CAPTIONS[:1], device="cpu", do_classifier_free_guidance=True
        )
        empty = m.empty_context(1)
    assert pipe.config.force_zeros_for_empty_prompt
    torch.testing.assert_close(empty["context"], negative.float())
    torch.testing.assert_close(empty["pooled"], negative_pooled.float())


def test_time_ids_are_diffusers_add_time_ids_of_each_sample(pipe):
    rows = time_ids(
        {B.ORIGINAL_SIZE: torch.tensor([[700, 512], [32, 48]]),
         B.CROP_TOP_LEFT: torch.tensor([[5, 0], [0, 8]])},
        (1024, 768),
    )  # fmt: skip
    proj = pipe.text_encoder_2.config.projection_dim
    for row, original, crop in zip(rows, [(700, 512), (32, 48)], [(5, 0), (0, 8)], strict=True):
        want = pipe._get_add_time_ids(original, crop, (1024, 768), torch.float32, proj)
        torch.testing.assert_close(row, want[0])
    meta = {k: torch.zeros(1, 2, dtype=torch.long, device="meta") for k in SDXL.SIZE_KEYS}
    assert time_ids(meta, (32, 32)).device.type == "meta"  # on the batch's device (a GPU's)
    with pytest.raises(KeyError, match="original_size"):
        time_ids({B.CROP_TOP_LEFT: torch.zeros(1, 2)}, (32, 32))


def test_the_training_step_is_the_published_sdxl_step(folder: Path, pipe):
    """The module's loss equals one computed with diffusers' own functions: encode_prompt for
    the context and pooled embedding, _get_add_time_ids from each sample's size and crop, the
    pipeline's U-Net; dropped captions get the pipeline's zeros."""
    m = module(folder, caption_dropout=0.5)
    b = batch(m)
    loss = m.training_step(b, 0).detach()
    # the same draws, outside the module
    g = m.step_generator()
    mean, std = m.encode_images(b[B.PIXELS])
    draws = m.draw(mean, g)
    latents = (mean + std * torch.randn(mean.shape, generator=g)) * pipe.vae.config.scaling_factor
    with torch.no_grad():
        embeds, zeros, pooled, zeros_pooled = pipe.encode_prompt(
            CAPTIONS, device="cpu", do_classifier_free_guidance=True
        )
        drop = draws["drop"]
        assert sorted(drop.tolist()) == [False, True]  # these draws take both paths
        embeds = torch.where(drop[:, None, None], zeros, embeds)
        pooled = torch.where(drop[:, None], zeros_pooled, pooled)
        proj = pipe.text_encoder_2.config.projection_dim
        ids = torch.cat([
            pipe._get_add_time_ids(tuple(o.tolist()), tuple(c.tolist()), (32, 32), torch.float32, proj)
            for o, c in zip(b[B.ORIGINAL_SIZE], b[B.CROP_TOP_LEFT], strict=True)
        ])  # fmt: skip
        alphas = pipe.scheduler.alphas_cumprod  # the folder's training schedule, v-prediction
        t, noise = draws["t"], draws["noise"]
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
        pred = m.unet(
            noisy, t, encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
        ).sample  # fmt: skip
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(loss, F.mse_loss(pred, target), rtol=1e-5, atol=1e-6)


def test_a_bright_image_encodes_finitely_with_the_vae_in_float16(folder: Path):
    """SDXL's VAE overflows in float16 (diffusers' force_upcast); sdtrain encodes in float32."""
    m = module(folder)
    with torch.no_grad():
        m.vae.encoder.conv_in.weight.mul_(1e5)  # activations past float16's 65504 on white
    m.vae.half()
    white = torch.ones(1, 3, 32, 32)
    with torch.no_grad():
        if torch.isfinite(m.vae.encode(white.half()).latent_dist.mean).all():
            pytest.skip("this CPU's float16 kernels did not overflow")
        mean, std = m.encode_images(white)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    assert m.vae.dtype == torch.float32  # kept there: it encodes every step
