"""Diffusion maths for training: noise, targets, SNR and loss weights. Pure functions on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, plus a per-channel constant shift of scale `offset`.

    The offset ("noise offset", typically 0.05-0.1) lets the model learn very dark and very bright
    images, which zero-mean noise alone cannot reach.
    """
    noise = torch.randn_like(latents)
    if offset:
        b, c = latents.shape[:2]
        noise = noise + offset * torch.randn(b, c, 1, 1, device=latents.device, dtype=latents.dtype)
    return noise


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, shape (B,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), shape (B,). gamma=5 is the paper's choice.

    For an epsilon target the weight is min(SNR, gamma) / SNR; for a v target the loss is already
    scaled by SNR + 1, so the weight is min(SNR, gamma) / (SNR + 1).
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t.clamp(min=1e-8)  # SNR is 0 at t=T under zero-terminal-SNR
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    raise ValueError(f"min-SNR weighting: unknown prediction_type {prediction_type!r}")


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the U-Net should predict under the scheduler's `prediction_type`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; use 'epsilon' or 'v_prediction'")


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE between prediction and target, averaged per sample, optionally weighted, then averaged."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
