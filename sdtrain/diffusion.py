"""Diffusion maths for training: noise, targets, SNR and loss weights. Pure functions on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdtrain.seeds import derive_seed


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device | str):
    """A torch.Generator on `device` for one micro-batch, seeded from (seed, rank, step, micro).

    Every draw of the training step (timesteps, noise, caption dropout, the VAE posterior) comes
    from it, so ranks draw apart, a resumed run continues the stream where it stopped instead of
    replaying its first steps, and the same (seed, rank, step, micro) always gives the same draws.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed("train-step", int(seed), int(rank), int(step), int(micro)))
    return gen


def sample_noise(
    latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise like `latents` (fp32), plus a per-channel constant shift of scale `offset`.

    The offset ("noise offset", typically 0.05-0.1) lets the model learn very dark and very bright
    images, which zero-mean noise alone cannot reach.
    """
    kw = dict(device=latents.device, dtype=torch.float32, generator=generator)
    noise = torch.randn(latents.shape, **kw)
    if offset:
        b, c = latents.shape[:2]
        noise = noise + offset * torch.randn(b, c, 1, 1, **kw)
    return noise


def add_noise(alphas_cumprod: torch.Tensor, latents, noise, timesteps) -> torch.Tensor:
    """Forward diffusion in fp32: sqrt(a_t) x0 + sqrt(1 - a_t) eps, shape of `latents`.

    Done here rather than with the scheduler's `add_noise`, which computes in the latents' dtype:
    under bf16 sqrt(1 - a_t) of SD's schedule rounds to 0 at t = 0, 1 and only ~190 distinct noise
    levels of 1000 remain.
    """
    a = alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps]
    a = a.view(-1, *([1] * (latents.ndim - 1)))  # (B, 1, 1, 1)
    return a.sqrt() * latents.float() + (1.0 - a).sqrt() * noise.float()


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, shape (B,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), shape (B,). gamma=5 is the paper's choice.

    Each target carries an implicit weight on the x0 error: the epsilon loss equals SNR * |x0 err|^2
    and the v loss (SNR + 1) * |x0 err|^2. Min-SNR caps that implicit weight at gamma, so the
    nearly clean, easy timesteps stop dominating: epsilon weight min(1, gamma / SNR), v weight
    min(1, gamma / (SNR + 1)).

    For v this caps the v loss's own (SNR + 1) rather than SNR as the paper's min(SNR, gamma) /
    (SNR + 1) does. The two agree wherever SNR >> 1, but the paper's rule sends the weight to 0 as
    SNR -> 0: under a zero-terminal-SNR schedule t = T got weight 0 and every t >= 900 at most
    0.003, starving exactly the steps that schedule exists to train (the image's overall
    composition from pure noise). Here those steps keep the plain v loss, weight 1.
    """
    if prediction_type == "epsilon":
        native = snr_t
    elif prediction_type == "v_prediction":
        native = snr_t + 1.0
    else:
        raise ValueError(f"min-SNR weighting: unknown prediction_type {prediction_type!r}")
    # gamma / max(native, gamma) == min(1, gamma / native), finite at SNR = 0 (weight 1)
    return gamma / torch.clamp(native, min=gamma)


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
