"""Tokenizers: loading a model folder's CLIP tokenizer and turning captions into token ids
(a pair of tokenizers, SDXL's, gives both sets of ids)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_tokenizer(path: str | Path):
    from transformers import CLIPTokenizer

    path = Path(path).expanduser()
    sub = path / "tokenizer"
    return CLIPTokenizer.from_pretrained(sub if sub.is_dir() else path)


def tokenize(tokenizer, texts: str | list[str]):
    """Captions -> (B, L) token ids, padded and truncated to the tokenizer's length (77 for CLIP);
    (B, 2, L) for a pair of tokenizers (SDXL's, `sdtrain.models.sdxl.TokenizerPair`)."""
    if hasattr(tokenizer, "two"):  # SDXL: both tokenizers' ids, each padded its own way
        return torch.stack([tokenize(t, texts) for t in tokenizer], dim=1)
    return tokenizer(
        [texts] if isinstance(texts, str) else list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
