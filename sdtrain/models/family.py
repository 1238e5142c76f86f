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
family, `SD`. Another (SDXL) is a subclass overriding what differs, one more entry in `FAMILIES`
and a case in `detect`.
"""

from __future__ import annotations

import json
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

    def condition(self, text_encoder: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> the context the U-Net cross-attends to: CLIP's last hidden state."""
        return text_encoder(input_ids)[0]

    def unet_inputs(self, context: torch.Tensor) -> dict[str, Any]:
        """The U-Net's keyword arguments besides the noisy latents and the timesteps."""
        return {"encoder_hidden_states": context}

    def scale_latents(self, vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the U-Net's latent space: minus the shift factor (if the VAE config has
        one), times the scaling factor (0.18215 for SD's VAE)."""
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return (latents - shift) * vae_config.scaling_factor

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
FAMILIES = {SD.pipeline_class: SD}
# Pipelines of families sdtrain cannot train yet: named, so the error says what the model is.
KNOWN = {
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusion3Pipeline": "SD3",
    "FluxPipeline": "Flux",
}


def detect(pretrained: str | Path) -> Family:
    """The family of a diffusers folder (its model_index.json's `_class_name`) or of an
    original-layout single file (SD-1.x / SD-2.x: `sdtrain.models.single_file` reads both)."""
    path = Path(pretrained).expanduser()
    index = path / "model_index.json"
    if path.is_file() or not index.is_file():  # a single file, or a folder without the index
        return SD
    name = json.loads(index.read_text()).get("_class_name", SD.pipeline_class)
    if name in FAMILIES:
        return FAMILIES[name]
    what = f"an {KNOWN[name]} model" if name in KNOWN else "a model"
    families = ", ".join(f"{f.description} ({p})" for p, f in FAMILIES.items())
    raise ValueError(
        f"model.pretrained: {index} names {name}: {what} of a family sdtrain does not train; "
        f"it trains {families}"
    )
