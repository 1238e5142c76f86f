"""The training system: frozen VAE + CLIP text encoder, trainable U-Net, diffusion loss."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from sdtrain import diffusion
from sdtrain.models import load_frozen, load_unet, tokenize

FROZEN = ("vae.", "text_encoder.")  # state-dict prefixes kept out of checkpoints


class StableDiffusionModule(L.LightningModule):
    """Trains a U-Net to denoise VAE latents conditioned on CLIP text embeddings.

    Args:
        pretrained: diffusers folder with vae/, text_encoder/, tokenizer/, scheduler/ (and unet/).
        optimizer: partial optimizer, finished with the U-Net parameters.
        lr_scheduler: partial LR scheduler, finished with the optimizer; stepped every step.
        unet_config: None to fine-tune the folder's U-Net; a dict or config.json path to train one
            from scratch.
        prediction_type: "epsilon" or "v_prediction" to override the folder's scheduler; None keeps
            the folder's.
        caption_dropout: probability of training on the empty caption (for classifier-free
            guidance at sampling time).
        min_snr_gamma: gamma for min-SNR loss weighting, None for plain MSE.
        noise_offset: scale of the per-channel noise offset, 0 to turn off.
        gradient_checkpointing: trade compute for memory in the U-Net.
    """

    def __init__(
        self,
        pretrained: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        unet_config: str | dict | None = None,
        prediction_type: str | None = None,
        caption_dropout: float = 0.1,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(
                f"model.prediction_type={prediction_type!r}; use 'epsilon' or 'v_prediction'"
            )
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"model.caption_dropout={caption_dropout} is not in [0, 1]")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.vae, self.text_encoder, self.tokenizer, self.noise_scheduler = load_frozen(pretrained)
        if prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval()
        self.unet = load_unet(pretrained, unet_config)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.strict_loading = False  # checkpoints hold the U-Net only; the frozen parts reload
        self.skipped_total = 0  # data samples skipped so far (this rank)
        self._empty_context: torch.Tensor | None = None

    def train(self, mode: bool = True):
        """Keep the frozen parts in eval mode whatever Lightning asks (no dropout, fixed norms)."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 77) token ids -> (B, 77, D) CLIP last hidden states."""
        return self.text_encoder(input_ids)[0]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/f, W/f) scaled latents (f: VAE downsampling)."""
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.sample() * self.vae.config.scaling_factor

    def empty_context(self, batch_size: int) -> torch.Tensor:
        """CLIP embedding of the empty caption, (B, 77, D): the unconditional input for CFG.

        Computed once per device; the text encoder is frozen, so it never changes.
        """
        if self._empty_context is None or self._empty_context.device != self.device:
            ids = tokenize(self.tokenizer, "").to(self.device)
            self._empty_context = self.encode_text(ids)  # (1, 77, D)
        return self._empty_context.expand(batch_size, -1, -1)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor):
        """U-Net prediction (epsilon or v) for noisy latents at `timesteps` given text `context`."""
        return self.unet(noisy, timesteps, encoder_hidden_states=context).sample

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        latents = self.encode_images(batch["pixel_values"])  # (B, 4, h, w)
        context = self.encode_text(batch["input_ids"])  # (B, 77, D)
        b = latents.shape[0]
        if self.hparams.caption_dropout > 0:
            drop = torch.rand(b, device=self.device) < self.hparams.caption_dropout
            context = torch.where(drop[:, None, None], self.empty_context(b), context)
        noise = diffusion.sample_noise(latents, self.hparams.noise_offset)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (b,), device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = diffusion.target_for(self.noise_scheduler, latents, noise, t)
        weights = None
        if self.hparams.min_snr_gamma:
            snr_t = diffusion.snr(self.noise_scheduler.alphas_cumprod, t)
            weights = diffusion.min_snr_weights(
                snr_t, self.hparams.min_snr_gamma, self.noise_scheduler.config.prediction_type
            )
        loss = diffusion.diffusion_loss(self(noisy, t, context), target, weights)

        self.skipped_total += int(batch.get("skipped", 0))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("data/skipped", float(self.skipped_total), reduce_fx="sum", sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = self.optimizer_factory(params=[p for p in self.unet.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return opt
        sched = self.lr_scheduler_factory(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen weights; record what export needs to rebuild the pipeline."""
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith(FROZEN)]:
            del sd[key]
        checkpoint["sdtrain"] = {
            "pretrained": str(self.hparams.pretrained),
            # plain JSON types only, so the checkpoint loads with torch.load(weights_only=True)
            "unet_config": json.loads(json.dumps(dict(self.unet.config), default=str)),
            "prediction_type": self.noise_scheduler.config.prediction_type,
            "skipped_total": self.skipped_total,
        }
        wandb_ids = [lg.version for lg in self.loggers if isinstance(lg, WandbLogger)]
        if wandb_ids:  # a resumed run logs on into the same W&B run
            checkpoint["sdtrain"]["wandb_run_id"] = wandb_ids[0]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = [k for k in self.unet.state_dict() if f"unet.{k}" not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} U-Net weights, e.g. unet.{missing[0]}")
        self.skipped_total = checkpoint.get("sdtrain", {}).get("skipped_total", 0)
