"""The training system: frozen VAE + CLIP text encoder, trainable U-Net, diffusion loss, EMA."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import lightning as L
import torch

from sdtrain.artifacts.cache import check_latent_cache
from sdtrain.datamodules import batch as B
from sdtrain.datamodules.position import DataPosition
from sdtrain.models import cuda_graphs, lora, speed, textual_inversion
from sdtrain.models import fp8 as fp8_matmuls
from sdtrain.models.parts import Parts
from sdtrain.runtime import devices
from sdtrain.training import diffusion, optimizers, prior, sharding
from sdtrain.training.checkpoint_hooks import CheckpointHooks
from sdtrain.training.draws import Draws
from sdtrain.training.ema import EMA
from sdtrain.training.encoding import Encoders, posterior_from_moments
from sdtrain.training.masked_loss import batch_weights, check_floor
from sdtrain.training.nonfinite import NonFiniteGuard
from sdtrain.training.offload import FrozenOffload, Offloading
from sdtrain.training.optimizer_hooks import OptimizerHooks
from sdtrain.training.skips import SkipTally

log = logging.getLogger(__name__)


class StableDiffusionModule(
    Encoders, Offloading, Draws, CheckpointHooks, OptimizerHooks, L.LightningModule
):
    """Trains a U-Net to denoise VAE latents conditioned on CLIP text embeddings.

    Args:
        parts: the built models (`sdtrain.models.loader.load_parts` or any loader that returns Parts).
        optimizer: partial optimizer, finished with the trainable parameters.
        lr_scheduler: partial LR scheduler, finished with the optimizer; stepped every step.
        ema: an EMA of the trainable weights, updated once per optimizer step; None for none.
        train_text_encoder: fine-tune the whole text encoder too (its own optimizer group); for
            SDXL true trains both, "te1" or "te2" one (`sdtrain.models.lora`).
        text_encoder_lr: the text encoder's learning rate (full or LoRA); None: the optimizer's.
        caption_dropout: probability of training on the empty caption (for classifier-free
            guidance at sampling time).
        min_snr_gamma: gamma for min-SNR loss weighting, None for plain MSE.
        noise_offset: scale of the per-channel noise offset, 0 to turn off.
        loss, huber_c, huber_schedule: "mse", or the pseudo-Huber "huber" / "smooth_l1" with its
            parameter c and how c follows the timestep (`diffusion.elementwise_loss`).
        input_perturbation: gamma of input perturbation, 0 to turn off (`diffusion.perturbed_noise`).
        timestep_sampling, logit_normal, timestep_range: how training timesteps are drawn:
            "uniform" or "logit_normal" with [mean, std], within [low, high) or all of [0, T)
            (`diffusion.sample_timesteps`).
        mask_floor, mask_normalize: the weight of the area outside a batch's loss masks
            (`data.mask`), and whether a sample's loss is the mask-weighted mean or the mean of
            the weighted loss (`sdtrain.training.masked_loss`).
        gradient_checkpointing: trade compute for memory in the U-Net.
        compile: torch.compile the U-Net: None (eager), "unet" (whole), "blocks" or "repeated"
            (regional: `sdtrain.models.speed.compile_unet`).
        channels_last: NHWC memory format for the U-Net (faster convolutions on GPUs).
        drop_layout_copies: with `compile` and `channels_last`, remove diffusers' `.contiguous()`
            copies in front of convolutions from the compiled graph (`sdtrain.models.layout`).
        attention: the fused attention kernel: None (PyTorch's choice), "flash", "efficient" or
            "cudnn" (`speed.set_attention`).
        fuse_projections: one matmul for each attention's q/k/v (k/v for cross-attention), the
            same parameters (`sdtrain.models.attention`).
        attention_pad_heads: zero-pad attention heads to a multiple of this width (e.g. 64) for
            the kernel call; the same values (`sdtrain.models.attention`). None: as they are.
        fp8: FP8 matmuls in the U-Net's linear layers: None, "tensorwise" or "rowwise"
            (`sdtrain.models.fp8`, torchao).
        cuda_graphs: with `compile`, record the compiled U-Net's forward and backward as CUDA
            graphs and replay them (`sdtrain.models.cuda_graphs`); a one-line reason where not.
        max_nonfinite_in_a_row: optimizer steps with NaN/inf gradients in a row before the run
            stops; each such step is skipped on every rank (`sdtrain.training.nonfinite`).
        max_bad_data_fraction: stop with an error naming the worst shards once more than this
            share of the data samples drawn was unusable (`sdtrain.training.skips`); None: never.
        fsdp_reduce_dtype: under trainer=fsdp, the dtype gradients are reduced in ("float32" or
            "bfloat16"; `sdtrain.training.sharding`).
        fsdp_param_dtype: under trainer=fsdp, None computes under the trainer's autocast as DDP
            does; "bfloat16" gathers and computes the U-Net in bf16 (`sdtrain.training.sharding`).
        prior_loss_weight: DreamBooth's lambda: the class samples' mean loss (`data=dreambooth`)
            counts this much beside the instance samples' (`sdtrain.training.prior`); None: off.
        offload_frozen: "auto", true or false: keep the VAE (and the frozen text encoder) in host
            memory between steps when the data is a latent cache (with the text conditioning):
            they come to the device for sampling and validation rounds only
            (`sdtrain.training.offload`).
        seed: base of the training draws (timesteps, noise, caption dropout), mixed with the rank
            and step (see `diffusion.step_generator`).
    """

    def __init__(
        self,
        parts: Parts,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        ema: EMA | None = None,
        train_text_encoder: bool | str = False,
        text_encoder_lr: float | None = None,
        caption_dropout: float = 0.1,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        loss: str = "mse",
        huber_c: float = 0.1,
        huber_schedule: str = "snr",
        input_perturbation: float = 0.0,
        timestep_sampling: str = "uniform",
        logit_normal: tuple[float, float] = (0.0, 1.0),
        timestep_range: tuple[int, int] | None = None,
        mask_floor: float = 0.0,
        mask_normalize: bool = True,
        gradient_checkpointing: bool = False,
        compile: str | None = None,
        channels_last: bool = False,
        drop_layout_copies: bool = True,
        attention: str | None = None,
        fuse_projections: bool = False,
        attention_pad_heads: int | None = None,
        fp8: str | None = None,
        cuda_graphs: bool = False,
        max_nonfinite_in_a_row: int = 10,
        max_bad_data_fraction: float | None = 0.5,
        fsdp_reduce_dtype: str = "float32",
        fsdp_param_dtype: str | None = None,
        prior_loss_weight: float | None = None,
        offload_frozen: bool | str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"model.caption_dropout={caption_dropout} is not in [0, 1]")
        speed.check(compile, attention, attention_pad_heads, cuda_graphs)
        fp8_matmuls.check(fp8, lora=lora.has_adapter(parts.unet))
        prior.check_weight(prior_loss_weight)
        num_train = parts.noise_scheduler.config.num_train_timesteps
        diffusion.check_options(loss, huber_c, huber_schedule, input_perturbation,
                                timestep_sampling, logit_normal, timestep_range, num_train)  # fmt: skip
        check_floor(mask_floor)  # model.mask_floor in [0, 1]
        # logger=False: sdtrain-train logs the composed config whole; Lightning's own merge of
        # the module's and the datamodule's hyperparameters refused any key both take with two
        # values (model.seed and data.seed), so neither could be set on its own
        self.save_hyperparameters(
            ignore=["parts", "optimizer", "lr_scheduler", "ema"], logger=False
        )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._hold_parts(parts, train_text_encoder, gradient_checkpointing)
        self.ema = ema
        self.offload = FrozenOffload(offload_frozen)  # parts kept off the device (configure_model)
        self._start_step_state(max_bad_data_fraction, max_nonfinite_in_a_row)

    def _hold_parts(
        self, parts: Parts, train_text_encoder: bool | str, gradient_checkpointing: bool
    ) -> None:
        """Take the built parts: the VAE frozen, the text encoder trained as asked, the U-Net
        checkpointed if asked, the noise schedule in fp32, where they came from."""
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.noise_scheduler
        self.family = parts.family  # what differs between model families (models/family.py)
        # the schedule in fp32, copied to the step's device once (`schedule`): indexing the
        # scheduler's CPU copy copied it to the GPU every step, a host sync. Not a buffer: a
        # module-wide cast (bf16-true) would round it, and checkpoints stay as they were.
        self._schedule = parts.noise_scheduler.alphas_cumprod.to(torch.float32).clone()
        self.pretrained = parts.pretrained
        self.single_file_config = parts.single_file_config  # recorded: export reloads with it
        self.vae.requires_grad_(False).eval()
        # trains fully (train_text_encoder), through LoRA adapters the loader added, or not at all
        self.text_encoder_trains = lora.set_text_encoder_training(
            self.text_encoder, train_text_encoder
        )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def _start_step_state(
        self, max_bad_data_fraction: float | None, max_nonfinite_in_a_row: int
    ) -> None:
        """The step's bookkeeping: the tally of unusable samples, the non-finite guard, the flags
        an optimizer step and its micro-batches share, and the module's once-set flags (fast
        settings applied, CUDA graph steps, non-strict loading)."""
        self._fast = False  # compile / channels-last applied (configure_model runs once)
        self._graph_steps = None  # model.cuda_graphs in use: sdtrain.models.cuda_graphs.Steps
        self.strict_loading = False  # checkpoints hold what trains; the frozen parts reload
        self.skips = SkipTally(max_bad_data_fraction)  # unusable data samples, all ranks
        self.nonfinite = NonFiniteGuard(max_nonfinite_in_a_row)
        self._skip_update = False  # this optimizer step's gradients were dropped
        self._found_inf: torch.Tensor | None = None  # or flagged, for the optimizer to skip
        self._grad_norm: torch.Tensor | None = None  # the check's total norm, for clipping
        self._empty_context: torch.Tensor | None = None
        self._micro, self._micro_step = 0, -1  # micro-batch index within the optimizer step
        self._lr_horizon: int | None = None  # the LR schedule's total steps (configure_optimizers)

    @property
    def parts(self) -> Parts:
        return Parts(
            self.unet,
            self.vae,
            self.text_encoder,
            self.tokenizer,
            self.noise_scheduler,
            self.pretrained,
            self.single_file_config,
            self.family,
        )

    def trainable_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of all that trains (U-Net, LoRA adapters, text encoder; names in
        `sdtrain.models.lora`): the optimizer's, the EMA's and the checkpoint's."""
        return lora.trainable(self.unet, self.text_encoder)

    def train(self, mode: bool = True):
        """Keep the frozen parts in eval mode whatever Lightning asks (no dropout, fixed norms)."""
        super().train(mode)
        self.vae.eval()
        if not self.text_encoder_trains:
            self.text_encoder.eval()
        return self

    # ------------------------------------------------------------------ encoding

    def latents_and_context(self, batch: dict[str, Any], g: torch.Generator):
        """fp32 latents, the conditioning ({"context", ...}: the family's) and the step's draws,
        encoding only what the batch lacks.

        The draws (timesteps, noise, caption dropout) come first and the VAE posterior sample
        last, so a batch of cached latents gets the same draws as the batch of pixels it came from.
        """
        image = B.image_key(batch)
        if image == B.LATENTS:
            latents, posterior = batch[B.LATENTS].float(), None
        elif image == B.LATENT_DIST:
            posterior = posterior_from_moments(batch[B.LATENT_DIST])
        else:
            posterior = self.encode_images(batch[B.PIXELS])
        like = latents if posterior is None else posterior[0]  # (B, C, h, w)
        cond = self.text_condition(batch)
        size = (like.shape[-2] * self.vae_factor, like.shape[-1] * self.vae_factor)  # in pixels
        extra = self.family.batch_conditioning(batch, size)  # SDXL: size and crop
        cond.update({k: v.to(like.device) for k, v in extra.items()})
        draws = self.draw(like, g)
        if posterior is not None:
            latents = self.sample_latents(*posterior, g)
        return latents, cond, draws

    @property
    def vae_factor(self) -> int:
        """The VAE's downsampling: 8 for SD and SDXL."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ the step

    def configure_model(self) -> None:
        """FSDP sharding (trainer=fsdp, sdtrain.training.sharding) and the fast settings (sdtrain.models.speed),
        applied in place once the strategy is set up."""
        if self._fast:
            return
        self._fast = True
        self.offload_frozen_parts()  # before the strategy moves the module to its device
        fsdp = self._trainer is not None and sharding.is_fsdp(self._trainer.strategy)
        if fsdp and self.text_encoder_trains:  # only the U-Net is sharded (and its grads reduced)
            raise ValueError("a training text encoder needs trainer=ddp, not trainer=fsdp")
        h = self.hparams
        fp8_matmuls.check(h.fp8, lora=False, fsdp=fsdp)
        if fsdp:
            mesh = self.device_mesh["data_parallel"]
            sharding.shard_unet(self.unet, mesh, h.fsdp_reduce_dtype, h.fsdp_param_dtype)
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else None
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        if speed.apply(self.unet, h, fsdp, device, accumulate):
            self._graph_steps = cuda_graphs.Steps()

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond):
        """U-Net prediction (epsilon or v) for noisy latents at `timesteps` given the conditioning
        `cond` (the family's dict, `latents_and_context`; a tensor is SD's text context)."""
        if self.hparams.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        if isinstance(cond, torch.Tensor):
            cond = {"context": cond}
        return self.unet(noisy, timesteps, **self.family.unet_inputs(cond)).sample

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        g = self.step_generator()
        latents, cond, draws = self.latents_and_context(batch, g)  # (B, 4, h, w), {"context"...}
        b, t, noise = latents.shape[0], draws["t"], draws["noise"]
        if self.hparams.caption_dropout > 0:
            cond = diffusion.drop_captions(cond, draws["drop"], self.empty_context(b))
        h, alphas = self.hparams, self.schedule(latents.device)
        model_noise = diffusion.perturbed_noise(noise, draws.get("perturb"), h.input_perturbation)
        noisy = diffusion.add_noise(alphas, latents, model_noise, t)  # the target keeps `noise`
        target = diffusion.target_for(self.noise_scheduler, latents, noise, t, alphas)
        weights = None
        if self.hparams.min_snr_gamma:
            snr_t = diffusion.snr(alphas, t)
            weights = diffusion.min_snr_weights(
                snr_t, self.hparams.min_snr_gamma, self.noise_scheduler.config.prediction_type
            )
        weights = prior.times_prior_weights(weights, batch, h.prior_loss_weight, latents.device)
        c = None
        if h.loss != "mse":
            num_train = self.noise_scheduler.config.num_train_timesteps
            c = diffusion.huber_c_at(h.huber_c, h.huber_schedule, t, alphas, num_train)
        mask_w = batch_weights(batch, latents.shape[-2:], h.mask_floor)  # or None
        pred = self(noisy, t, cond)
        loss = diffusion.diffusion_loss(pred, target, weights, h.loss, c, mask_w, h.mask_normalize)

        self.count_skipped(batch)
        # a progress-bar metric is read back (.item(), a host sync) on every step: only with a bar
        bar = self._trainer is not None and self._trainer.progress_bar_callback is not None
        self.log("train/loss", loss, prog_bar=bar)
        lr = optimizers.step_size(self.optimizers().param_groups[0])  # Prodigy's: lr x d
        self.log("train/lr", devices.scalar(lr, self.device))
        self.log("data/skipped", self.skips.total.float())
        for kind, n in zip(B.SKIP_KINDS, self.skips.by_kind.float(), strict=True):
            self.log(f"data/skipped/{kind}", n)
        return loss

    def count_skipped(self, batch: dict[str, Any]) -> None:
        """Add the samples skipped while this batch was made, summed over all ranks, to the
        run's totals (`sdtrain.training.skips`; it stops the run past `max_bad_data_fraction`)."""
        reduce = None
        if self._trainer is not None and self._trainer.world_size > 1:
            reduce = partial(self._trainer.strategy.reduce, reduce_op="sum")
        self.skips.add(batch, self.device, reduce)

    def on_train_end(self) -> None:
        """One summary line of what was skipped (the warnings name each sample)."""
        self.nonfinite.settle(self.global_step, stop=False)  # steps skipped on the device
        if self._trainer is not None and not self._trainer.is_global_zero:
            return
        counts = self.skips.kinds()
        if counts or self.nonfinite.total:
            kinds = ", ".join(f"{k} {n}" for k, n in counts.items()) or "none"
            log.warning(
                "skipped %d data samples (%s) and %d non-finite steps in this run",
                int(self.skips.total.item()),
                kinds,
                self.nonfinite.total,
            )
        if self.skips.by_shard:  # rank 0's shards (each rank reads its own)
            log.warning("shards with the most skipped samples: %s", self.skips.worst_shards())

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks every run needs whatever the config lists: the data position in checkpoints."""
        return [DataPosition()]

    # ------------------------------------------------------------------ EMA

    def on_fit_start(self) -> None:
        dm = self._trainer.datamodule if self._trainer is not None else None
        info = getattr(dm, "latent_cache_info", None)
        if info is not None:  # a latent cache must come from this model's VAE (and text encoder)
            check_latent_cache(info, self.vae, self.text_encoder, self.pretrained, self.family)
        if dm is not None and textual_inversion.embeddings(self.text_encoder):  # new tokens:
            dm.tokenizer = self.tokenizer  # captions tokenize with them (the folder's lacks them)
        if self.ema is not None:
            self.ema.attach(self.trainable_parameters())

    def pipeline(self, sampler: str = "ddim"):
        """A diffusers text-to-image pipeline over this module's parts (shared, not copied)."""
        from sdtrain.artifacts.sampling import build_pipeline

        parts = (self.vae, self.text_encoder, self.tokenizer, self.unet, self.noise_scheduler)
        return build_pipeline(*parts, sampler, family=self.family)
