"""Turn one raw WebDataset sample (bytes per extension) into a training example, or say why not."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import torch
from PIL import Image

from sdtrain.models import tokenize

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_JSON_FIELDS = ("caption", "text", "prompt")  # img2dataset writes "caption"


class SkipSample(Exception):
    """A sample that cannot be trained on (no image, undecodable image, no caption)."""


def find_image(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if sample.get(ext):
            return sample[ext]
    raise SkipSample(f"no image (looked for .{', .'.join(IMAGE_EXTS)})")


def find_caption(sample: dict) -> str:
    """Caption from `KEY.txt`, else from `caption`/`text`/`prompt` in `KEY.json`."""
    if sample.get("txt"):
        text = sample["txt"].decode("utf-8", errors="replace").strip()
        if text:
            return text
    if sample.get("json"):
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise SkipSample(f"unreadable .json ({e})") from e
        for field in CAPTION_JSON_FIELDS:
            if isinstance(meta, dict) and isinstance(meta.get(field), str) and meta[field].strip():
                return meta[field].strip()
    raise SkipSample("no caption (.txt, or caption/text/prompt in .json)")


def decode_image(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for broken files
        raise SkipSample(f"image does not decode ({type(e).__name__}: {e})") from e
    return img.convert("RGB")


def resize_crop(img: Image.Image, size: int, center_crop: bool) -> Image.Image:
    """Resize the short side to `size` (Lanczos), then crop a `size` square (centre or random)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    if center_crop:
        left, top = (nw - size) // 2, (nh - size) // 2
    else:
        left, top = random.randint(0, nw - size), random.randint(0, nh - size)
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1], the range the SD VAE expects."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageTextTransform:
    """Raw sample -> {"pixel_values", "input_ids", "caption"}; raises SkipSample when unusable."""

    def __init__(self, tokenizer, resolution: int, center_crop: bool, random_flip: bool):
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip  # `random` is reseeded per DataLoader worker

    def __call__(self, sample: dict) -> dict:
        caption = find_caption(sample)
        img = decode_image(find_image(sample))
        img = resize_crop(img, self.resolution, self.center_crop)
        if self.random_flip and random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        ids = tokenize(self.tokenizer, caption)[0]  # (77,)
        return {"pixel_values": to_tensor(img), "input_ids": ids, "caption": caption}


def collate(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, 3, H, W)
        "input_ids": torch.stack([e["input_ids"] for e in examples]),  # (B, 77)
        "caption": [e["caption"] for e in examples],
        "skipped": sum(e["skipped"] for e in examples),
    }


def batch_size(batch: dict) -> int:
    """Images in a collated batch (for Lightning's ThroughputMonitor)."""
    return batch["pixel_values"].shape[0]
