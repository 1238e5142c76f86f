"""A validation loss that ranks runs: the same weights give the same number, on any rank count.

`train/loss` is one batch at random timesteps and noise: too noisy to compare runs by. This is
the diffusion loss on held-out data (`data.val_shards`, or `data.val_split_shards` of the
training shards) with every draw fixed:

- each held-out sample i gets its VAE posterior sample and its noise from a generator seeded by
  (seed, i), never by the rank, so 1 and 2 processes draw the same;
- every sample is scored at the same K timesteps, the centres of K equal strata of [0, T)
  (stratified over the schedule: t = 0 and t = T - 1 alone would say little);
- the real caption always (no caption dropout), and plain MSE on the prediction target (no min-SNR
  weights: runs that sweep `min_snr_gamma` stay comparable);
- per-sample fp32 losses are summed in float64 with their count and all-reduced (sum) over ranks:
  float64 holds such sums exactly (53 bits against fp32's 24, for losses within a few powers of two
  of each other), so the order ranks add them in does not change the result.

It runs from a callback (`sdtrain.callbacks.val_loss.ValidationLoss`) rather than Lightning's validation loop: training is
counted in optimizer steps over an endless train loader, and Lightning's `val_check_interval`
counts loader batches (micro-batches under gradient accumulation), runs a sanity check before
training and does not run at the last step unless the interval divides it. The callback runs at
exact optimizer steps and once at the end, with the raw weights (`val/loss`) and within the
module's EMA scope (`val/loss_ema`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.heldout import INDEX, WEIGHT
from sdtrain.runtime.seeds import derive_seed
from sdtrain.training import diffusion

log = logging.getLogger(__name__)

VAL_LOSS = "val/loss"
VAL_LOSS_EMA = "val/loss_ema"
# what the validation callback logs (with the lowest so far of each)
VAL_KEYS = (VAL_LOSS, VAL_LOSS_EMA, f"{VAL_LOSS}_best", f"{VAL_LOSS_EMA}_best")


def in_sweep() -> bool:
    """True inside a Hydra multirun (grid or Optuna trial)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_optimized_metric(cfg: Any, datamodule: Any) -> None:
    """In a sweep, refuse before training an `optimized_metric` of the validation loss that the
    run could never log: no held-out data, no `ValidationLoss` callback, or no EMA for `_ema`."""
    key = str(cfg.get("optimized_metric") or "")
    if not key.startswith("val/loss") or not in_sweep():
        return
    targets = [str(c.get("_target_")) for c in (cfg.get("callbacks") or {}).values() if c]
    why = []
    if not getattr(datamodule, "val_urls", None):
        why.append("no held-out data (set data.val_shards or data.val_split_shards)")
    if "sdtrain.callbacks.val_loss.ValidationLoss" not in targets:  # a name: callbacks sit above
        why.append("no validation callback (callbacks.val_loss)")
    if "_ema" in key and not cfg.model.get("ema"):
        why.append("no EMA (model.ema=null)")
    if why:
        raise ValueError(
            f"optimized_metric={key} would never be logged: {'; '.join(why)}; "
            "or sweep on optimized_metric=train/loss"
        )


def optimized_value(metrics: Mapping[str, Any], key: str, sweep: bool) -> float | None:
    """What `train()` returns: `metrics[key]` (the trainer's callback_metrics).

    A key the run never logged (no held-out data for `val/loss_ema`, a typo) is an error in a
    sweep, which must not rank its trials by another number; a single run warns and returns
    `train/loss`, as runs did before the validation loss existed: in one short line for the
    validation losses (no held-out data, or no EMA), naming the metrics logged for another key.
    """
    if key in metrics:
        return float(metrics[key])
    fallback = metrics.get("train/loss")
    fallback = None if fallback is None else float(fallback)
    if not sweep and key in VAL_KEYS:  # one short line, not the run's metric names
        if VAL_LOSS in metrics:  # held-out data, but no EMA weights to score
            log.warning("no EMA (model.ema=null): %s not logged; returning train/loss", key)
        else:
            log.warning(
                "no held-out data: %s not logged; add data.val_shards=<shards> or "
                "data.val_split_shards=1 to rank runs by it (returning train/loss)",
                key,
            )
        return fallback
    have = ", ".join(sorted(metrics)) or "none"
    why = f"optimized_metric={key} was never logged (metrics logged: {have})" + (
        "; it needs held-out data: set data.val_shards or data.val_split_shards"
        if key.startswith("val/")
        else ""
    )
    if sweep:
        raise ValueError(why)
    log.warning("%s; returning train/loss instead", why)
    return fallback


def timestep_grid(num_train_timesteps: int, k: int) -> torch.Tensor:
    """The K timesteps every held-out sample is scored at: the centres of K equal strata of
    [0, T), e.g. T=1000, K=4 -> 125, 375, 625, 875. (K,) long."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_train_timesteps:
        raise ValueError(
            f"callbacks.val_loss.timesteps={k!r} must be a whole number in [1, {num_train_timesteps}]"
        )
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * num_train_timesteps / k).long()


def sample_draws(seed: int, index: int, shape: tuple[int, ...], k: int) -> torch.Tensor:
    """(1 + K, *shape) fp32 standard normals for held-out sample `index`: the VAE posterior's
    draw, then one noise per timestep. Drawn on the CPU, so every device and rank agrees."""
    g = torch.Generator().manual_seed(derive_seed("val", int(seed), int(index)))
    return torch.randn((1 + k, *shape), generator=g, dtype=torch.float32)


def posterior(module: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 (mean, std) of the batch's VAE posterior, or (latents, None) for cached latents."""
    from sdtrain.training.encoding import posterior_from_moments

    image = B.image_key(batch)
    if image == B.LATENTS:
        return batch[B.LATENTS].float(), None
    if image == B.LATENT_DIST:
        return posterior_from_moments(batch[B.LATENT_DIST])
    return module.encode_images(batch[B.PIXELS])


@torch.no_grad()
def held_out_latents(
    module: Any, batch: dict[str, Any], seed: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (B, 4, h, w), noise draws (B, K, 4, h, w)) of one held-out batch: each sample's
    posterior sample and its K noises, from its fixed draws (`sample_draws`). The VAE is frozen,
    so raw and EMA weights share these: a round encodes its images once."""
    mean, std = posterior(module, batch)  # (B, 4, h, w)
    draws = torch.stack([sample_draws(seed, i, tuple(mean.shape[1:]), k) for i in batch[INDEX]])
    draws = draws.to(mean.device)  # (B, 1 + K, 4, h, w)
    if std is None:
        return mean, draws[:, 1:]
    latents = module.family.scale_latents(module.vae.config, mean + std * draws[:, 0])
    return latents, draws[:, 1:]


@torch.no_grad()
def losses_at(
    module: Any,
    batch: dict[str, Any],
    latents: torch.Tensor,
    noises: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """(B,) fp32 losses of the module's current weights: the MSE on the prediction target,
    averaged over the K `timesteps` with the K `noises`. The caption is encoded here, under the
    weights scored (a trained text encoder has EMA weights too)."""
    cond = module.text_condition(batch)  # {"context": (B, 77, D), ...}
    size = (latents.shape[-2] * module.vae_factor, latents.shape[-1] * module.vae_factor)
    extra = module.family.batch_conditioning(batch, size)  # SDXL: size and crop
    cond.update({k: v.to(latents.device) for k, v in extra.items()})
    sched, dev = module.noise_scheduler, latents.device
    total = torch.zeros(latents.shape[0], device=dev, dtype=torch.float32)
    alphas = module.schedule(dev)
    for j, t_j in enumerate(timesteps.tolist()):
        t = torch.full((latents.shape[0],), t_j, device=dev, dtype=torch.long)
        noisy = diffusion.add_noise(alphas, latents, noises[:, j], t)
        target = diffusion.target_for(sched, latents, noises[:, j], t, alphas)
        pred = module(noisy, t, cond)
        total += F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return total / len(timesteps)


def per_sample_losses(
    module: Any, batch: dict[str, Any], timesteps: torch.Tensor, seed: int
) -> torch.Tensor:
    """(B,) fp32 losses of one held-out batch under the module's current weights (`losses_at`
    of `held_out_latents`). `module` is the `StableDiffusionModule`."""
    latents, noises = held_out_latents(module, batch, seed, len(timesteps))
    return losses_at(module, batch, latents, noises, timesteps)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(
    module: Any,
    batches: Iterable[dict[str, Any]],
    timesteps: int = 8,
    seed: int = 0,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    forward_context: Callable[[], Any] = nullcontext,
) -> float | None:
    """The mean held-out loss of `module`'s current weights over `batches` (this rank's share),
    summed over ranks by `reduce`; None when there is no held-out sample at all. One weight set
    of `evaluate_weights`, which documents the arguments."""
    kw = dict(timesteps=timesteps, seed=seed, reduce=reduce, forward_context=forward_context)
    return evaluate_weights(module, batches, {"": current_weights}, **kw)[""]


@contextmanager
def current_weights() -> Iterator[bool]:
    yield True


def evaluate_weights(
    module: Any,
    batches: Iterable[dict[str, Any]],
    weights: Mapping[str, Callable[[], Any]],
    timesteps: int = 8,
    seed: int = 0,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    forward_context: Callable[[], Any] = nullcontext,
) -> dict[str, float | None]:
    """The mean held-out loss of each weight set, by name, in one pass over `batches`: each
    batch is moved and encoded once, then scored under every set.

    Args:
        module: the `StableDiffusionModule` (evaluated in eval mode, restored after).
        batches: held-out batches with `index` and `weight` (`datamodules.heldout.HeldOut`).
        weights: name -> a context manager factory that puts a weight set in for its scope and
            yields whether it did (`module.ema_weights` yields False without an EMA: that name
            is then left out of the result).
        timesteps: K, the timesteps per sample (`timestep_grid`).
        seed: base of the per-sample draws.
        reduce: sums a float64 (2,) tensor (loss sum, sample count) over ranks.
        forward_context: the trainer's precision context (bf16 autocast), as training runs.
    """
    grid = timestep_grid(module.noise_scheduler.config.num_train_timesteps, timesteps)
    sums = {name: torch.zeros(2, dtype=torch.float64, device=module.device) for name in weights}
    absent: set[str] = set()
    was_training = module.training
    module.eval()
    try:
        for batch in batches:
            batch = to_device(batch, module.device)
            weight = float(batch[WEIGHT])  # 0 for a rank's padding batch
            with forward_context():
                latents, noises = held_out_latents(module, batch, seed, len(grid))
            for name, scope in weights.items():
                with scope() as present, forward_context():
                    if not present:
                        absent.add(name)
                        continue
                    losses = losses_at(module, batch, latents, noises, grid)
                count = losses.new_tensor(len(losses), dtype=torch.float64)
                sums[name] += weight * torch.stack([losses.double().sum(), count])
    finally:
        module.train(was_training)
    result: dict[str, float | None] = {}
    for name, total in sums.items():
        if name in absent:
            continue
        total, count = (reduce(total) if reduce is not None else total).tolist()
        result[name] = None if count == 0 else total / count
    return result
