"""What the frozen parts compute for a training step: CLIP contexts and VAE posteriors.

A mixin of `sdtrain.training.module.StableDiffusionModule`, kept apart from the step and the optimizer;
it reads the module's `family`, `text_encoder`, `tokenizer`, `vae`, `device` and
`text_encoder_trains`, and brings an offloaded part in with its `frozen_on_device`
(`sdtrain.training.offload`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from sdtrain.datamodules import batch as B


def posterior_from_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2C, h, w) mean and log-variance -> fp32 mean and std, as diffusers' VAE computes them."""
    mean, logvar = moments.float().chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


class Encoders:
    """Text and image encoding for the module (see the module docstring for the attributes)."""

    _empty_context: dict[str, torch.Tensor] | None = None

    def encode_text(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token ids -> the family's text conditioning in float32: {"context": (B, 77, D)}, CLIP's
        last hidden states for SD, plus "pooled" for SDXL (with grad if the text encoder trains)."""
        grad = self.text_encoder_trains and torch.is_grad_enabled()
        with self.frozen_on_device(["text_encoder"], "token ids"), torch.set_grad_enabled(grad):
            cond = self.family.condition(self.text_encoder, input_ids)  # offloaded: rounds only
        return {k: v.float() for k, v in cond.items()}

    def text_condition(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's text conditioning: its cached contexts, or its token ids encoded."""
        if B.text_key(batch) == B.CONTEXT:
            if self.text_encoder_trains:  # cached contexts come from the text encoder as it was
                raise ValueError("the text encoder trains: use a latent cache made without --text")
            return self.family.cached(batch)
        return self.encode_text(batch[B.INPUT_IDS])

    def empty_context(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The conditioning of a dropped caption, batch `batch_size`: the unconditional input for
        CFG (SD: the empty caption's CLIP embedding; SDXL: zeros).

        Computed once per device while the text encoder is frozen (an offloaded one comes to
        the device for it: `sdtrain.training.offload`); every step while it trains.
        """
        if (
            self.text_encoder_trains
            or self._empty_context is None
            or any(v.device != self.device for v in self._empty_context.values())
        ):
            grad = self.text_encoder_trains and torch.is_grad_enabled()
            with self.frozen_on_device(["text_encoder"]), torch.set_grad_enabled(grad):
                empty = self.family.unconditional(self.text_encoder, self.tokenizer, self.device)
            if self.text_encoder_trains:
                return {k: v.expand(batch_size, *v.shape[1:]) for k, v in empty.items()}
            self._empty_context = empty  # each (1, ...)
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in self._empty_context.items()}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> the VAE posterior's fp32 mean and std, (B, 4, H/f, W/f).

        The VAE runs in its dtype, never in float16 where the family says it overflows there
        (SDXL's: float32 then, bfloat16 as it is); the posterior is sampled later, in fp32 (`sample_latents`).
        """
        scope = contextlib.nullcontext()
        if self.family.vae_overflows_in_fp16(self.vae):  # SDXL's: never float16
            if self.vae.dtype == torch.float16:
                self.vae.float()  # once, in place
            kind = pixels.device.type
            if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
                scope = torch.autocast(kind, enabled=False)
        with scope, self.frozen_on_device(["vae"], "pixels"):  # offloaded: rounds only
            dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, g: torch.Generator):
        """A posterior sample, scaled as the family scales latents (SD: times the VAE's scaling
        factor): the latents the U-Net learns on."""
        eps = torch.randn(mean.shape, device=mean.device, dtype=torch.float32, generator=g)
        return self.family.scale_latents(self.vae.config, mean + std * eps)
