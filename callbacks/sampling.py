"""Sample a prompt grid every N steps and at the end; PNG in the run folder, images to W&B."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from sdtrain.artifacts.sampling import generate, grid
from sdtrain.callbacks.periodic import EveryNSteps

log = logging.getLogger(__name__)


def eager():
    """Run a compiled U-Net eagerly: sampling's other batch shapes would otherwise recompile it."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else nullcontext()


class SampleImages(EveryNSteps):
    """Generates one image per prompt with fixed seeds (the module's EMA weights when it has them).

    Every rank runs the model (a rank-0-only forward would hang under FSDP); rank 0 writes
    `<out_dir>/step_XXXXXXX.png` and logs the captioned images to each W&B logger.

    Args:
        prompts: one image per prompt.
        every_n_steps: sample after every this many optimizer steps (0: only at the end).
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale (1 turns guidance off).
        seed: prompt i uses seed + i.
        height: image height in pixels (None: the model's default).
        width: image width in pixels (None: the model's default).
        sampler: "ddim", "euler" or "dpm++".
        use_ema: sample with the EMA weights when available.
        out_dir: where PNG grids go (None: `<trainer.default_root_dir>/samples`).
        tile_px: grid tiles are upscaled to at least this many pixels (a 32 px model's images
            are unreadable at their own size).
        upscale: "nearest" (crisp, whole factors) or "lanczos" (smooth).
    """

    state_key_last = "last_sampled"  # its checkpoint key since the first release

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        sampler: str = "ddim",
        use_ema: bool = True,
        out_dir: str | None = None,
        tile_px: int = 128,
        upscale: str = "nearest",
    ) -> None:
        if not prompts:
            raise ValueError("callbacks.sample_images.prompts is empty")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.kwargs = dict(
            seed=seed,
            steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
        )
        self.sampler = sampler
        self.use_ema = use_ema
        self.out_dir = out_dir
        self.tile_px = tile_px
        self.upscale = upscale
        self.last_round: int | None = None  # step of the last round (checkpointed)
        self.saved: list[Path] = []

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sample(trainer, pl_module)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step  # EveryNSteps has recorded it as last_round
        pipe = pl_module.pipeline(self.sampler)
        was_training = pl_module.training
        pl_module.eval()
        try:
            weights = pl_module.ema_weights() if self.use_ema else nullcontext(False)
            with pl_module.frozen_on_device(), weights as ema, eager():  # VAE, text encoder in
                images = generate(pipe, self.prompts, **self.kwargs)
        finally:
            pl_module.train(was_training)
        if trainer.is_global_zero:
            self._publish(trainer, images, step, "EMA" if ema else "raw")

    def folder(self, trainer: L.Trainer) -> Path:
        """Where the grids go."""
        return Path(self.out_dir or Path(trainer.default_root_dir) / "samples")

    def _publish(self, trainer: L.Trainer, images, step: int, weights: str) -> None:
        out = self.folder(trainer)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step_{step:07d}.png"
        label = f"step {step} ({weights} weights)"
        grid(images, self.prompts, self.tile_px, label, self.upscale).save(path)
        self.saved.append(path)
        log.info("samples at step %d -> %s", step, path)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key="samples", images=images, caption=self.prompts, step=step)
