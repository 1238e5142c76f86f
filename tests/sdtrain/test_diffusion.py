"""Diffusion maths against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from sdtrain import diffusion


def test_min_snr_weights_epsilon_and_v():
    snr = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(
        diffusion.min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25])
    )
    assert torch.allclose(
        diffusion.min_snr_weights(snr, 5.0, "v_prediction"),
        torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]),
    )
    assert torch.isfinite(diffusion.min_snr_weights(torch.tensor([0.0]), 5.0, "epsilon")).all()
    with pytest.raises(ValueError, match="sample"):
        diffusion.min_snr_weights(snr, 5.0, "sample")


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
