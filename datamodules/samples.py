"""A raw sample's image and caption bytes, and `SkipSample`: why a sample cannot be trained on."""

from __future__ import annotations

import json

from sdtrain.datamodules import batch as B

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_JSON_FIELDS = ("caption", "text", "prompt")  # img2dataset writes "caption"
SKIP_KINDS = B.SKIP_KINDS


class SkipSample(Exception):
    """A sample that cannot be trained on; `kind` is one of SKIP_KINDS."""

    def __init__(self, message: str, kind: str) -> None:
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {kind!r}")
        super().__init__(message)
        self.kind = kind


def find_image(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if sample.get(ext):
            return sample[ext]
    raise SkipSample(f"no image (looked for .{', .'.join(IMAGE_EXTS)})", "no_image")


def find_caption(sample: dict) -> str:
    """Caption from `KEY.txt`, else from `caption`/`text`/`prompt` in `KEY.json`."""
    if sample.get("txt"):
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise SkipSample(f"caption is not UTF-8 ({e})", "bad_caption") from e
        if text:
            return text
    if sample.get("json"):
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise SkipSample(f"unreadable .json ({e})", "bad_caption") from e
        for field in CAPTION_JSON_FIELDS:
            if isinstance(meta, dict) and isinstance(meta.get(field), str) and meta[field].strip():
                return meta[field].strip()
    raise SkipSample("no caption (.txt, or caption/text/prompt in .json)", "no_caption")
