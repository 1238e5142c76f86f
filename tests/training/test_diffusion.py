"""Diffusion maths against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from sdtrain.training import diffusion


def recipe_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR weights as diffusers' train_text_to_image.py computes them (Hang et al. 2023)."""
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        return weights / snr
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights  # sample: the x0 loss weighted by min(SNR, gamma) itself


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_min_snr_weights_are_the_published_ones(kind: str, beta_schedule: str):
    sched = DDPMScheduler(
        beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, prediction_type=kind
    )
    t = torch.arange(1000)
    got = diffusion.min_snr_weights(diffusion.snr(sched.alphas_cumprod, t), 5.0, kind)
    torch.testing.assert_close(got, recipe_weights(sched, t, 5.0), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="flow"):
        diffusion.min_snr_weights(diffusion.snr(sched.alphas_cumprod, t), 5.0, "flow")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_at_zero_snr_is_the_plain_loss(kind: str):
    """Zero terminal SNR: t = 999 has SNR 0 (epsilon's weight would be 0 / 0); it gets weight 1,
    every other step the published weight."""
    sched = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        prediction_type=kind,
    )
    t = torch.arange(1000)
    w = diffusion.min_snr_weights(diffusion.snr(sched.alphas_cumprod, t), 5.0, kind)
    assert torch.isfinite(w).all() and w[999] == 1.0
    torch.testing.assert_close(w[:999], recipe_weights(sched, t[:999], 5.0), rtol=1e-5, atol=0)


def test_snr_from_alphas():
    a = torch.tensor([0.9, 0.5, 0.1])
    assert torch.allclose(diffusion.snr(a, torch.tensor([0, 2])), torch.tensor([9.0, 0.1 / 0.9]))


def test_targets_follow_prediction_type():
    lat, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(diffusion.target_for(eps, lat, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * lat  # v = sqrt(a) eps - sqrt(1-a) x0
    assert torch.allclose(diffusion.target_for(v, lat, noise, t), expected, atol=1e-6)
    # from bf16 latents still in fp32 (diffusers' get_velocity computes in the latents' dtype)
    got = diffusion.target_for(v, lat.bfloat16(), noise, t, v.alphas_cumprod.double())
    want = a.double().sqrt() * noise.double() - (1 - a.double()).sqrt() * lat.bfloat16().double()
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-6)


def test_weighted_loss_and_noise_offset():
    pred, target = (
        torch.zeros(2, 1, 2, 2),
        torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)]),
    )
    assert diffusion.diffusion_loss(pred, target).item() == pytest.approx(2.5)
    w = torch.tensor([1.0, 0.0])
    assert diffusion.diffusion_loss(pred, target, w).item() == pytest.approx(0.5)
    torch.manual_seed(0)
    lat = torch.zeros(512, 4, 8, 8)
    plain, offset = diffusion.sample_noise(lat), diffusion.sample_noise(lat, 0.5)
    # per-(sample, channel) means: ~N(0, 1/64) plain; an offset adds variance 0.25
    assert plain.mean((2, 3)).var() < 0.05 < 0.2 < offset.mean((2, 3)).var()


def test_noising_is_fp32_closed_form_even_from_bf16_latents():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    lat = torch.randn(4, 4, 8, 8).bfloat16()
    noise = torch.randn(4, 4, 8, 8)
    t = torch.arange(4)
    noisy = diffusion.add_noise(sched.alphas_cumprod, lat, noise, t)
    a = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * lat.double() + (1 - a).sqrt() * noise.double()
    assert noisy.dtype == torch.float32
    assert torch.allclose(noisy.double(), expected, atol=1e-6)
    assert not torch.equal(noisy[0], lat[0].float())  # sigma_0 does not round to 0


def test_step_generator_is_keyed_on_seed_rank_step_and_micro():
    def draw(*key):
        return torch.randint(0, 1000, (8,), generator=diffusion.step_generator(*key, "cpu"))

    assert torch.equal(draw(0, 0, 5, 0), draw(0, 0, 5, 0))
    base = draw(0, 0, 5, 0)
    for other in [(1, 0, 5, 0), (0, 1, 5, 0), (0, 0, 6, 0), (0, 0, 5, 1)]:
        assert not torch.equal(base, draw(*other)), other
