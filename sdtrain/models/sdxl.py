"""SDXL, the second model family: two CLIP text encoders, a pooled text embedding and size/crop
conditioning (Podell et al. 2023, "SDXL", sections 2.1-2.2), through the seam in
`sdtrain.models.family`.

What differs from SD-1.x/2.x, as diffusers' `StableDiffusionXLPipeline.encode_prompt` and
Stability's generative-models compute it:

- the context is the penultimate hidden states of both encoders (CLIP ViT-L, 768, and OpenCLIP
  ViT-bigG, 1280), concatenated on features: (B, 77, 2048);
- the second encoder's pooled, projected output (`text_embeds`, (B, 1280)) is an extra input;
- `time_ids` = (original height, width, crop top, crop left, target height, width) per sample,
  from the data as each image was decoded, cropped and bucketed (`time_ids`);
- caption dropout zeroes both encoders' conditioning (generative-models' `ucg_rate` multiplies the
  embedding by 0; the pipeline's `force_zeros_for_empty_prompt` samples with the same zeros);
- the VAE (scaling factor 0.13025) overflows in float16: it encodes in float32 then (`vae_dtype`).

The two encoders travel as one module (`TextEncoderPair`: `te1`, `te2`, the names kohya's LoRA
keys use) and the two tokenizers as one (`TokenizerPair`): token ids are (B, 2, 77), so the
module, EMA, LoRA and checkpoints treat "the text encoder" as they do for SD.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from sdtrain.models.family import Family


class TextEncoderPair(torch.nn.Module):
    """SDXL's two text encoders as one module: `te1` (CLIPTextModel, diffusers' `text_encoder`)
    and `te2` (CLIPTextModelWithProjection, `text_encoder_2`). Parameter names are `te1.…` and
    `te2.…` (in checkpoints under `text_encoder.`)."""

    def __init__(self, te1: torch.nn.Module, te2: torch.nn.Module) -> None:
        super().__init__()
        self.te1, self.te2 = te1, te2

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 2, L) token ids (first and second tokenizer's) -> SDXL's conditioning."""
        one = self.te1(input_ids[:, 0], output_hidden_states=True)
        two = self.te2(input_ids[:, 1], output_hidden_states=True)
        context = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        return {"context": context, "pooled": two.text_embeds}

    @property
    def dtype(self) -> torch.dtype:
        return self.te1.dtype

    @property
    def context_dim(self) -> int:
        return self.te1.config.hidden_size + self.te2.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.te2.config.projection_dim


class TokenizerPair:
    """SDXL's two CLIP tokenizers as one: called as a tokenizer, its `input_ids` are (B, 2, L)
    (`sdtrain.models.parts.tokenize` stacks them). The second pads with its own pad token."""

    def __init__(self, one, two) -> None:
        self.one, self.two = one, two
        self.model_max_length = one.model_max_length

    def __iter__(self):
        return iter((self.one, self.two))

    def __len__(self) -> int:
        return len(self.one)

    def tokenize(self, text: str) -> list[str]:
        return self.one.tokenize(text)


class SDXLFamily(Family):
    name = "sdxl"
    description = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    single_file = (
        "sdtrain.models.single_file_sdxl"  # conditioner.embedders.0/1, model.diffusion_model
    )
    # the batch keys it reads (`sdtrain.datamodules.batch`, a layer above: named, not imported)
    SIZE_KEYS = (ORIGINAL_SIZE, CROP_TOP_LEFT) = ("original_size", "crop_top_left")
    POOLED, CONTEXT = "pooled", "context"

    def load_text(self, path: str | Path):
        """The pair of text encoders and the pair of tokenizers from a diffusers SDXL folder."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = Path(path).expanduser()
        te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
        tok1 = CLIPTokenizer.from_pretrained(path / "tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2")
        return TextEncoderPair(te1, te2), TokenizerPair(tok1, tok2)

    def condition(self, text_encoder: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 2, L) token ids -> {"context": (B, L, 2048), "pooled": (B, 1280)} for SDXL's sizes."""
        if input_ids.dim() != 3 or input_ids.shape[1] != 2:
            raise ValueError(
                f"SDXL takes token ids of both tokenizers, (B, 2, L); got {tuple(input_ids.shape)}"
                " (a batch tokenized with one tokenizer: point data.tokenizer at the SDXL folder)"
            )
        return text_encoder(input_ids)

    def unconditional(self, text_encoder: Any, tokenizer: Any, device) -> dict[str, torch.Tensor]:
        """Zeros for both encoders' conditioning, as SDXL trained and samples (see the module)."""
        ids = torch.zeros(1, 2, tokenizer.model_max_length, dtype=torch.long, device=device)
        with torch.no_grad():
            cond = text_encoder(ids)
        return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in cond.items()}

    def cached(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if batch.get(self.POOLED) is None:
            raise KeyError(
                "an SDXL batch with cached contexts needs the pooled embeddings too ('pooled'): "
                "the latent cache was made without them; cache again with --text from this model"
            )
        return {"context": batch[self.CONTEXT].float(), "pooled": batch[self.POOLED].float()}

    def batch_conditioning(self, batch: dict[str, Any], size: tuple[int, int]):
        """{"time_ids": (B, 6)}: each sample's (original h, w, crop top, left) from the data and
        the target size `size` (h, w) in pixels, the size it trains at (its bucket's)."""
        return {"time_ids": time_ids(batch, size)}

    def example_condition(self, unet: Any, context: torch.Tensor) -> dict[str, torch.Tensor]:
        b, cfg = context.shape[0], unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        zeros = partial(torch.zeros, device=context.device, dtype=context.dtype)
        return {"context": context, "pooled": zeros(b, pooled), "time_ids": zeros(b, 6)}

    def unet_inputs(self, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        extra = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return {"encoder_hidden_states": cond["context"], "added_cond_kwargs": extra}

    def vae_overflows_in_fp16(self, vae: Any) -> bool:
        """SDXL's VAE overflows to inf/NaN in float16 (its config says `force_upcast`; the
        fp16-fixed VAE says false): it encodes in float32 then, bfloat16 (float32's range) as is."""
        return bool(getattr(vae.config, "force_upcast", True))

    def pipeline(self, vae, text_encoder, tokenizer, unet, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder.te1,
            text_encoder_2=text_encoder.te2,
            tokenizer=tokenizer.one,
            tokenizer_2=tokenizer.two,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,  # SDXL's unconditional input: zeros (as trained)
            add_watermarker=False,
        )


def time_ids(batch: dict[str, Any], size: tuple[int, int]) -> torch.Tensor:
    """(B, 6) float32 (original h, w, crop top, crop left, target h, w), SDXL's `add_time_ids`
    (diffusers' `_get_add_time_ids`), one row per sample of `batch`."""
    missing = [k for k in SDXLFamily.SIZE_KEYS if batch.get(k) is None]
    if missing:
        raise KeyError(
            f"an SDXL batch needs each sample's {' and '.join(missing)} (SDXL's size and crop "
            "conditioning): the webdataset datamodule gives them for images, and a latent cache "
            f"made by this sdtrain keeps them; this batch has {sorted(batch)}"
        )
    original = torch.as_tensor(batch[SDXLFamily.ORIGINAL_SIZE])
    crop = torch.as_tensor(batch[SDXLFamily.CROP_TOP_LEFT])
    target = torch.tensor(size, dtype=original.dtype, device=original.device)
    target = target.expand(original.shape[0], 2)
    return torch.cat([original, crop, target], dim=1).float()


SDXL = SDXLFamily()
