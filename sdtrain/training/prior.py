"""DreamBooth's prior-preservation loss as per-sample weights on the diffusion loss.

DreamBooth (Ruiz et al. 2023, eq. 2; diffusers' examples/dreambooth/train_dreambooth.py) trains on
the subject's images and the class images in one batch, and adds the class images' loss times
lambda (`prior_loss_weight`):

    loss = mean over instance samples of l_i + lambda * mean over class samples of l_j

The step averages per-sample losses over the whole batch of B = k + m samples
(`diffusion.diffusion_loss`), so weights of B / k on each of the k instance samples and
lambda B / m on each of the m class samples give that loss exactly: the same value and gradient
as diffusers' halves, for any split of the batch. Min-SNR weights, where set, multiply these.
"""

from __future__ import annotations

from typing import Any

import torch

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.dreambooth import CLASS  # the class images' source name


def check_weight(prior_loss_weight: float | None) -> None:
    """Refuse a negative or non-number `model.prior_loss_weight`."""
    if prior_loss_weight is None:
        return
    number = isinstance(prior_loss_weight, (int, float)) and not isinstance(prior_loss_weight, bool)
    if not number or not prior_loss_weight >= 0:
        raise ValueError(f"model.prior_loss_weight={prior_loss_weight!r} must be a number >= 0")


def prior_weights(
    batch: dict[str, Any], prior_loss_weight: float | None, device: torch.device
) -> torch.Tensor | None:
    """(B,) fp32 weights making the batch's mean loss DreamBooth's (module docs), or None when
    there is nothing to weight: no `prior_loss_weight`, or a batch without class samples."""
    sources = batch.get(B.SOURCES)
    if prior_loss_weight is None or not sources or CLASS not in sources:
        return None
    is_class = [s == CLASS for s in sources]  # counted on the host: no device sync per step
    n, m = len(sources), sum(is_class)
    if m == n:  # a batch of class samples alone: their mean, times lambda
        return torch.full((n,), float(prior_loss_weight), device=device)
    instance, klass = n / (n - m), float(prior_loss_weight) * n / m
    return torch.tensor([klass if c else instance for c in is_class], device=device)


def times_prior_weights(
    weights: torch.Tensor | None,
    batch: dict[str, Any],
    prior_loss_weight: float | None,
    device: torch.device,
) -> torch.Tensor | None:
    """`weights` (B,) (min-SNR's, or None) times the batch's `prior_weights`, where it has any."""
    prior = prior_weights(batch, prior_loss_weight, device)
    if prior is None:
        return weights
    return prior if weights is None else weights * prior
