"""What the frozen parts compute for a training step: CLIP contexts and VAE posteriors.

A mixin of `sdtrain.training.module.StableDiffusionModule`, kept apart from the step and the optimizer;
it reads the module's `family`, `text_encoder`, `tokenizer`, `vae`, `device` and
`text_encoder_trains`.
"""

from __future__ import annotations

import torch

from sdtrain.models.parts import tokenize


def posterior_from_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2C, h, w) mean and log-variance -> fp32 mean and std, as diffusers' VAE computes them."""
    mean, logvar = moments.float().chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


class Encoders:
    """Text and image encoding for the module (see the module docstring for the attributes)."""

    _empty_context: torch.Tensor | None = None

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 77) token ids -> the family's context, (B, 77, D) CLIP last hidden states for SD
        (with grad if the text encoder trains)."""
        with torch.set_grad_enabled(self.text_encoder_trains and torch.is_grad_enabled()):
            return self.family.condition(self.text_encoder, input_ids)

    def empty_context(self, batch_size: int) -> torch.Tensor:
        """CLIP embedding of the empty caption, (B, 77, D): the unconditional input for CFG.

        Computed once per device while the text encoder is frozen; every step while it trains.
        """
        if self.text_encoder_trains:
            ids = tokenize(self.tokenizer, "").to(self.device)
            return self.encode_text(ids).float().expand(batch_size, -1, -1)
        if self._empty_context is None or self._empty_context.device != self.device:
            ids = tokenize(self.tokenizer, "").to(self.device)
            self._empty_context = self.encode_text(ids).float()  # (1, 77, D)
        return self._empty_context.expand(batch_size, -1, -1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> the VAE posterior's fp32 mean and std, (B, 4, H/f, W/f).

        The VAE may run in bf16; the posterior is sampled later, in fp32 (`sample_latents`).
        """
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, g: torch.Generator):
        """A posterior sample, scaled as the family scales latents (SD: times the VAE's scaling
        factor): the latents the U-Net learns on."""
        eps = torch.randn(mean.shape, device=mean.device, dtype=torch.float32, generator=g)
        return self.family.scale_latents(self.vae.config, mean + std * eps)
