"""Model families: what differs between Stable Diffusion generations, named in one place.

The loader (`sdtrain.models.loader`) picks the family from the model itself and hands it over on
`Parts.family`; the training step, EMA, checkpoints and the data path call its methods and never
ask which family it is. A family says:

- which text encoders and tokenizers the model has (`text_encoders`, `tokenizers`: the diffusers
  folder's subfolders, so `folders()` is what a model folder must hold);
- how a caption's token ids become the U-Net's conditioning (`condition`: the context, and any
  extra conditioning such as SDXL's pooled embedding and size/crop time ids) and how that reaches
  the U-Net (`unet_inputs`);
- how VAE latents are scaled for the U-Net (`scale_latents`: the VAE config's scaling factor, and
  its shift factor where it has one);
- the diffusers pipeline class for sampling and export (`pipeline_class`, `pipeline`);
- the single-file key layout (`single_file`: the module that maps the original checkpoint names).

SD-1.x and SD-2.x (one CLIP text encoder, its last hidden state as the context) are the first
family, `SD`. SDXL (`sdtrain.models.sdxl`) is a subclass overriding what differs, one more entry
in `sdtrain.models.families`, whose `detect` finds the family of a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class Family:
    """SD-1.x / SD-2.x: the base every family overrides where it differs."""

    name = "sd"
    description = "Stable Diffusion 1.x / 2.x"
    pipeline_class = "StableDiffusionPipeline"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    single_file = "sdtrain.models.single_file"  # the original (CompVis / Stability) key layout

    def folders(self) -> tuple[str, ...]:
        """The subfolders a diffusers folder of this family holds."""
        return ("unet", "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    def load_text(self, path: str | Path):
        """(text encoder, tokenizer) from a diffusers folder of this family."""
        from transformers import CLIPTextModel

        from sdtrain.models.tokens import load_tokenizer

        path = Path(path).expanduser()
        return CLIPTextModel.from_pretrained(path, subfolder="text_encoder"), load_tokenizer(path)

    def condition(self, text_encoder: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, L) token ids -> {"context": (B, L, D)}, what the U-Net cross-attends to: CLIP's
        last hidden state. Families with more text conditioning add keys (SDXL: "pooled")."""
        return {"context": text_encoder(input_ids)[0]}

    def unconditional(self, text_encoder: Any, tokenizer: Any, device) -> dict[str, torch.Tensor]:
        """The conditioning of a dropped caption, batch 1, float32: the empty caption's (SD)."""
        from sdtrain.models.tokens import tokenize

        ids = tokenize(tokenizer, "").to(device)
        return {k: v.float() for k, v in self.condition(text_encoder, ids).items()}

    def cached(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The text conditioning a batch of cached contexts holds (`sdtrain.datamodules.batch`)."""
        return {"context": batch["context"].float()}

    def batch_conditioning(self, batch: dict[str, Any], size: tuple[int, int]) -> dict:
        """Conditioning taken from the data rather than the caption (SDXL: size and crop), for
        a batch training at `size` (h, w) pixels; SD has none."""
        return {}

    def example_condition(self, unet: Any, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """A conditioning of the right shapes around `context` (B, L, D), for counting FLOPs."""
        return {"context": context}

    def unet_inputs(self, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The U-Net's keyword arguments besides the noisy latents and the timesteps."""
        return {"encoder_hidden_states": cond["context"]}

    def vae_overflows_in_fp16(self, vae: Any) -> bool:
        """Whether the VAE must encode in float32 rather than float16 (SD's is safe in it)."""
        return False

    def scale_latents(self, vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the U-Net's latent space: minus the shift factor (if the VAE config has
        one), times the scaling factor (0.18215 for SD's VAE)."""
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return (latents - shift) * vae_config.scaling_factor

    def single_file_module(self):
        """The module that reads and writes this family's original single-file layout: its
        `load_single_file(path, config, unet=None) -> Parts` and
        `save_single_file(path, unet, vae, text_encoder, dtype) -> Path`."""
        import importlib

        return importlib.import_module(self.single_file)

    def pipeline(self, vae, text_encoder, tokenizer, unet, scheduler):
        """The diffusers pipeline over these modules (shared, not copied), no safety checker."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.description}>"


SD = Family()
