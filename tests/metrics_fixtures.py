"""Tiny local stand-ins for the image metrics' networks: a CLIP folder and an FID feature net.

Real CLIP (ViT-L/14) and Inception weights are downloads; the machines that run the tests have no
internet, so these play their parts through the same code paths (`from_pretrained` on a folder, a
`feature` module handed to torchmetrics' FID).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sdtrain.demo.tiny import build_tokenizer, token_fields


def make_tiny_clip(out: str | Path, image_px: int = 32, seed: int = 0) -> Path:
    """Write a random transformers CLIPModel + CLIPProcessor folder (what `clip_model` names)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_tokenizer()
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        **token_fields(tokenizer),
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=image_px,
        patch_size=8,  # (image_px / 8)^2 patches: 16 at 32 px
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    # Random towers' embeddings point apart about half the time, and CLIPScore clamps a negative
    # mean to 0. A bias shared by both towers' last norms (one projection for both) makes image and
    # text embeddings agree in part, so scores are positive and still vary with the inputs.
    with torch.no_grad():
        shared = torch.randn(32)
        for norm in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
            norm.weight.mul_(0.5)
            norm.bias.copy_(shared)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    images = CLIPImageProcessor(
        size={"shortest_edge": image_px}, crop_size={"height": image_px, "width": image_px}
    )
    out = Path(out)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    return out


class TinyFeatures(nn.Module):
    """A fixed random conv net for FID: uint8 (N, 3, H, W) images -> (N, num_features).

    Deterministic for a seed (FID compares features of two sets, so both must come from the
    same net); any image size (global average pooling).
    """

    def __init__(self, num_features: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.num_features = num_features  # torchmetrics reads this instead of a dummy forward
        self.conv = nn.Conv2d(3, num_features, kernel_size=3)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0  # FID hands uint8 images (normalize=False)
        return torch.relu(self.conv(x)).mean(dim=(2, 3))
