"""The masked loss: each latent element's loss weighted by its image's mask (`data.mask`).

The mask (B, 1, H, W) in [0, 1] comes with the batch (`sdtrain.datamodules.masks`), at pixel
resolution from image shards or on the latent grid from a latent cache. It is area-averaged to the
latent grid, so a latent cell weighs the share of its 8 x 8 pixels the mask covers, and becomes
the weight w = floor + (1 - floor) m (`model.mask_floor`): at floor 0 the unmasked area gets
weight 0 and so no gradient, at floor 1 the mask changes nothing.

Each sample's loss is then the w-weighted mean of its elements, sum(w l) / sum(w) over channels
and cells (`model.mask_normalize=true`, the default): a sample's loss keeps the scale of an
unmasked one whatever share of the image the mask covers (OneTrainer's "normalize masked area
loss"). `false` takes the plain mean of w l instead, as kohya sd-scripts does: a sample masked to
a tenth of its area then trains with about a tenth of the gradient. A sample weighted 0 everywhere
(floor 0, an empty mask) adds 0 either way. Min-SNR weights and the batch mean apply after it.
"""

from __future__ import annotations

from typing import Any

import torch

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.masks import latent_mask


def check_floor(floor: float) -> None:
    """Refuse a `model.mask_floor` outside [0, 1]."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"model.mask_floor={floor} is not in [0, 1]")


def mask_weights(mask: torch.Tensor, floor: float) -> torch.Tensor:
    """w = floor + (1 - floor) m, shape of `mask`."""
    return floor + (1.0 - floor) * mask


def batch_weights(
    batch: dict[str, Any], size: tuple[int, int], floor: float
) -> torch.Tensor | None:
    """The batch's per-cell loss weights (B, 1, h, w) on the latent grid `size`, or None for a
    batch without a mask."""
    if batch.get(B.MASK) is None:
        return None
    return mask_weights(latent_mask(batch[B.MASK], size), floor)


def weighted_per_sample(
    elementwise: torch.Tensor, weights: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """(B,) per-sample loss of an elementwise loss (B, C, h, w) under weights (B, 1, h, w),
    broadcast over channels: sum(w l) / sum(w) with `normalize`, else mean(w l)."""
    weights = weights.float().expand_as(elementwise)
    total = (elementwise * weights).sum(dim=(1, 2, 3))
    if not normalize:
        return total / elementwise[0].numel()
    return total / weights.sum(dim=(1, 2, 3)).clamp_min(torch.finfo(torch.float32).tiny)
