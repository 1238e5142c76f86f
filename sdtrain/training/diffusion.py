"""Diffusion maths for training: noise, targets, SNR and loss weights. Pure functions on tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdtrain.runtime.seeds import derive_seed
from sdtrain.training import masked_loss


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
    """Min-SNR-gamma loss weights as published (Hang et al. 2023, section 3.4 and 4.2; diffusers'
    training scripts), shape (B,). gamma=5 is the paper's choice.

    The paper weights the x0 error by min(SNR, gamma). Each target already carries an implicit x0
    weight (epsilon: SNR, v: SNR + 1, sample: 1), so the loss on that target is divided by it:
    epsilon min(SNR, gamma) / SNR, v min(SNR, gamma) / (SNR + 1), sample min(SNR, gamma).

    SNR = 0 (only the last step of a zero-terminal-SNR schedule) gets weight 1, the plain loss, as
    diffusers' scripts set it: epsilon's 0 / 0 is undefined there, and v's and sample's 0 would
    never train the step that schedule adds. Every SNR > 0 keeps the published weight.
    """
    capped = torch.clamp(snr_t, max=gamma)  # min(SNR, gamma)
    if prediction_type == "epsilon":
        weights = capped / snr_t
    elif prediction_type == "v_prediction":
        weights = capped / (snr_t + 1.0)
    elif prediction_type == "sample":
        weights = capped
    else:
        raise ValueError(f"min-SNR weighting: unknown prediction_type {prediction_type!r}")
    return torch.where(snr_t == 0, torch.ones_like(weights), weights)


def target_for(
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the U-Net should predict under the scheduler's `prediction_type`.

    The v target sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022) in fp32, as `add_noise`,
    from `alphas_cumprod` (default: the scheduler's); the module passes its copy on the GPU.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        alphas = scheduler.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
        a = alphas.to(device=latents.device, dtype=torch.float32)[timesteps]
        a = a.view(-1, *([1] * (latents.ndim - 1)))
        return a.sqrt() * noise.float() - (1.0 - a).sqrt() * latents.float()
    raise ValueError(f"unsupported prediction_type {kind!r}; use 'epsilon' or 'v_prediction'")


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    kind: str = "mse",
    c: torch.Tensor | None = None,
    mask_weights: torch.Tensor | None = None,
    mask_normalize: bool = True,
) -> torch.Tensor:
    """The loss (`elementwise_loss`: MSE by default) between prediction and target, averaged per
    sample (under `mask_weights` (B, 1, h, w) if given: `masked_loss.weighted_per_sample`),
    optionally weighted, then averaged."""
    loss = elementwise_loss(pred, target, kind, c)
    if mask_weights is None:
        per_sample = loss.mean(dim=(1, 2, 3))
    else:
        per_sample = masked_loss.weighted_per_sample(loss, mask_weights, mask_normalize)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


# ---------------------------------------------------------------------- loss options (issue 10)

LOSSES = ("mse", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def check_options(
    loss: str,
    huber_c: float,
    huber_schedule: str,
    input_perturbation: float,
    timestep_sampling: str,
    logit_normal: tuple[float, float] | list[float],
    timestep_range: tuple[int, int] | list[int] | None,
    num_train_timesteps: int,
) -> None:
    """Refuse a bad loss option at build time, naming the `model.` key and its value."""
    choices = (
        ("loss", loss, LOSSES),
        ("huber_schedule", huber_schedule, HUBER_SCHEDULES),
        ("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLING),
    )
    for key, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"model.{key}={value!r}; use one of {', '.join(allowed)}")
    if not 0.0 < huber_c <= 1.0:
        raise ValueError(f"model.huber_c={huber_c} is not in (0, 1]")
    if input_perturbation < 0.0:
        raise ValueError(f"model.input_perturbation={input_perturbation} is negative")
    if len(logit_normal) != 2 or logit_normal[1] <= 0:
        raise ValueError(f"model.logit_normal={list(logit_normal)} is not [mean, std > 0]")
    if timestep_range is not None:
        whole = len(timestep_range) == 2 and all(type(v) is int for v in timestep_range)
        low, high = timestep_range if whole else (-1, -1)
        if not 0 <= low < high <= num_train_timesteps:
            raise ValueError(
                f"model.timestep_range={list(timestep_range)} is not [low, high) with "
                f"0 <= low < high <= {num_train_timesteps} (the scheduler's num_train_timesteps)"
            )


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    generator: torch.Generator,
    device: torch.device | str,
    kind: str = "uniform",
    logit_normal: tuple[float, float] | list[float] = (0.0, 1.0),
    timestep_range: tuple[int, int] | list[int] | None = None,
) -> torch.Tensor:
    """Training timesteps (B,) int64 in [low, high) (default [0, T)), drawn from `generator`.

    uniform: every step equally likely, one `randint` call (the draws of runs before these options).
    logit_normal: SD3's sampler (Esser et al. 2024, eq. 19): u ~ N(mean, std), t = sigmoid(u) in
    (0, 1), mapped to floor(low + t (high - low)). With mean 0 and std 1 it favours the middle
    steps, where the target is hardest to predict, over the nearly clean and nearly pure-noise ends.
    `timestep_range` narrows either kind to [low, high): e.g. [0, 500) trains only the detail steps.
    """
    low, high = timestep_range if timestep_range is not None else (0, num_train_timesteps)
    if kind == "uniform":
        return torch.randint(low, high, (batch,), device=device, generator=generator)
    if kind == "logit_normal":
        mean, std = logit_normal
        u = torch.randn(batch, device=device, generator=generator) * std + mean
        t = low + torch.sigmoid(u.double()) * (high - low)  # float64: floor exact at the bounds
        return t.floor().long().clamp(low, high - 1)
    raise ValueError(f"model.timestep_sampling={kind!r}; use one of {', '.join(TIMESTEP_SAMPLING)}")


def perturbed_noise(noise: torch.Tensor, extra: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """The noise the inputs are made with under input perturbation (Ning et al. 2023, eq. 9):
    eps + gamma * xi, xi ~ N(0, I); the target stays eps. The model then sees, in training, inputs
    a little off the forward process, as its own imperfect predictions put them at sampling time
    (exposure bias). gamma = 0.1 is the paper's value; 0 (or no `extra`) returns `noise` itself."""
    if not gamma or extra is None:
        return noise
    return noise + gamma * extra


def huber_c_at(
    c: float, schedule: str, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, num_train: int
) -> torch.Tensor:
    """The pseudo-Huber parameter per sample (B,), scheduled as in Khrapov & Popov 2024
    ("scheduled pseudo-Huber loss", diffusers' research example): constant c; exponential
    c_t = exp(-alpha t), alpha = -ln(c) / T, so 1 at t = 0 falling to c at t = T; snr
    c_t = (1 - c) / (1 + sigma_t)^2 + c, sigma_t = sqrt((1 - a_t) / a_t), so near 1 at the clean
    steps (fine detail: MSE-like) and c at the noisy ones (composition: robust to outliers)."""
    t = timesteps.to(torch.float64)
    if schedule == "constant":
        out = torch.full_like(t, c)
    elif schedule == "exponential":
        out = torch.exp(math.log(c) / num_train * t)
    elif schedule == "snr":
        a = alphas_cumprod.to(timesteps.device, torch.float64)[timesteps]
        sigma = ((1.0 - a) / a).sqrt()  # inf at zero terminal SNR: c_t = c there
        out = (1.0 - c) / (1.0 + sigma) ** 2 + c
    else:
        raise ValueError(f"model.huber_schedule={schedule!r}; use one of {HUBER_SCHEDULES}")
    return out.float()


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", c: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-element loss in fp32, shape of `pred`. d = pred - target, c (B,) from `huber_c_at`:

    mse: d^2. huber (pseudo-Huber): 2 c (sqrt(d^2 + c^2) - c), ~d^2 for |d| << c and ~2 c |d|
    beyond, so a few outlier samples (bad captions, corrupted images) pull less. smooth_l1: the
    same over c, 2 (sqrt(d^2 + c^2) - c): ~d^2 / c near 0, ~2 |d| beyond. Both as in Khrapov &
    Popov 2024 and diffusers' scheduled-Huber example.
    """
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="none")
    if c is None:
        raise ValueError(f"model.loss={kind!r} needs the Huber parameter c")
    c = c.float().view(-1, *([1] * (pred.ndim - 1)))  # (B, 1, 1, 1)
    d2 = (pred - target) ** 2
    root = d2 / (torch.sqrt(d2 + c**2) + c)  # = sqrt(d^2 + c^2) - c, without fp32 cancellation
    if kind == "huber":
        return 2.0 * c * root
    if kind == "smooth_l1":
        return 2.0 * root
    raise ValueError(f"model.loss={kind!r}; use one of {', '.join(LOSSES)}")


def drop_captions(
    cond: dict[str, torch.Tensor], drop: torch.Tensor, empty: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The conditioning with each sample where `drop` (B,) is true replaced by the family's
    unconditional one (`empty`, the same keys: the text's; size and crop stay as they were)."""
    out = dict(cond)
    for k, e in empty.items():
        mask = drop.view(-1, *([1] * (cond[k].dim() - 1)))
        out[k] = torch.where(mask, e, cond[k])
    return out
