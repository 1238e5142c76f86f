"""What the training step noises with: the fp32 noise schedule on the step's device, and each
micro-batch's seeded draws (timesteps, noise, caption dropout, input perturbation). A mixin of
StableDiffusionModule (see its docstring for the attributes used here)."""

from __future__ import annotations

import torch

from sdtrain.training import diffusion


class Draws:
    """The noise schedule and the random draws of the training step."""

    def schedule(self, device: torch.device) -> torch.Tensor:
        """alphas_cumprod in fp32 on `device` (copied there on first use only)."""
        if self._schedule.device != device:
            self._schedule = self._schedule.to(device)
        return self._schedule

    def step_generator(self) -> torch.Generator:
        """The generator for this micro-batch; micro counts batches within one optimizer step."""
        step = self.global_step
        self._micro = self._micro + 1 if step == self._micro_step else 0
        self._micro_step = step
        return diffusion.step_generator(
            self.hparams.seed, self.global_rank, step, self._micro, self.device
        )

    def draw(self, latents: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Timesteps `t` (B,), fp32 `noise` like `latents`, and the caption-dropout mask (B,)."""
        b, h = latents.shape[0], self.hparams
        t = diffusion.sample_timesteps(
            b,
            self.noise_scheduler.config.num_train_timesteps,
            g,
            self.device,
            h.timestep_sampling,
            h.logit_normal,
            h.timestep_range,
        )
        noise = diffusion.sample_noise(latents, self.hparams.noise_offset, generator=g)
        drop = torch.rand(b, device=self.device, generator=g) < self.hparams.caption_dropout
        draws = {"t": t, "noise": noise, "drop": drop}
        if h.input_perturbation:  # drawn last: the other draws stay those of a run without it
            draws["perturb"] = torch.randn(noise.shape, device=noise.device, generator=g)
        return draws
