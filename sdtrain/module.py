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
        seed: base of the training draws (timesteps, noise, caption dropout), mixed with the rank
            and step (see `diffusion.step_generator`).
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
        seed: int = 0,
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
        self.skipped_total = torch.zeros(())  # data samples skipped so far, all ranks
        self._empty_context: torch.Tensor | None = None
        self._micro, self._micro_step = 0, -1  # micro-batch index within the optimizer step

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

    def empty_context(self, batch_size: int) -> torch.Tensor:
        """CLIP embedding of the empty caption, (B, 77, D): the unconditional input for CFG.

        Computed once per device; the text encoder is frozen, so it never changes.
        """
        if self._empty_context is None or self._empty_context.device != self.device:
            ids = tokenize(self.tokenizer, "").to(self.device)
            self._empty_context = self.encode_text(ids).float()  # (1, 77, D)
        return self._empty_context.expand(batch_size, -1, -1)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor):
        """U-Net prediction (epsilon or v) for noisy latents at `timesteps` given text `context`."""
        return self.unet(noisy, timesteps, encoder_hidden_states=context).sample

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
        b = latents.shape[0]
        t = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (b,),
            device=self.device,
            generator=g,
        )
        noise = diffusion.sample_noise(latents, self.hparams.noise_offset, generator=g)
        drop = torch.rand(b, device=self.device, generator=g) < self.hparams.caption_dropout
        return {"t": t, "noise": noise, "drop": drop}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/f, W/f) fp32 scaled latents (f: VAE downsampling).

        The VAE may run in bf16; its posterior is sampled in fp32.
        """
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        eps = torch.randn(mean.shape, device=mean.device, dtype=torch.float32, generator=g)
        return (mean + std * eps) * self.vae.config.scaling_factor

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        g = self.step_generator()
        latents = self.encode_images(batch["pixel_values"], g)  # (B, 4, h, w) fp32
        context = self.encode_text(batch["input_ids"]).float()  # (B, 77, D)
        draws = self.draw(latents, g)
        b, t, noise = latents.shape[0], draws["t"], draws["noise"]
        if self.hparams.caption_dropout > 0:
            context = torch.where(draws["drop"][:, None, None], self.empty_context(b), context)
        noisy = diffusion.add_noise(self.noise_scheduler.alphas_cumprod, latents, noise, t)
        target = diffusion.target_for(self.noise_scheduler, latents, noise, t)
        weights = None
        if self.hparams.min_snr_gamma:
            snr_t = diffusion.snr(self.noise_scheduler.alphas_cumprod, t)
            weights = diffusion.min_snr_weights(
                snr_t, self.hparams.min_snr_gamma, self.noise_scheduler.config.prediction_type
            )
        loss = diffusion.diffusion_loss(self(noisy, t, context), target, weights)

        self.count_skipped(int(batch.get("skipped", 0)))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("data/skipped", self.skipped_total)
        return loss

    def count_skipped(self, n: int) -> None:
        """Add this rank's skipped samples, summed over all ranks, to the run's total.

        The total is the same on every rank, so the checkpoint (written from rank 0) restores it
        right on all of them. It stays a device tensor: no host sync on the hot path.
        """
        skipped = torch.tensor(float(n), device=self.device)
        if self._trainer is not None and self._trainer.world_size > 1:
            skipped = self._trainer.strategy.reduce(skipped, reduce_op="sum")
        self.skipped_total = self.skipped_total.to(self.device) + skipped

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
            "skipped_total": int(self.skipped_total.item()),
        }
        wandb_ids = [lg.version for lg in self.loggers if isinstance(lg, WandbLogger)]
        if wandb_ids:  # a resumed run logs on into the same W&B run
            checkpoint["sdtrain"]["wandb_run_id"] = wandb_ids[0]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = [k for k in self.unet.state_dict() if f"unet.{k}" not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} U-Net weights, e.g. unet.{missing[0]}")
        self.skipped_total = torch.tensor(
            float(checkpoint.get("sdtrain", {}).get("skipped_total", 0))
        )
