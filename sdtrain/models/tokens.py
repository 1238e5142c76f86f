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
    (B, 2, L) for a pair of tokenizers (SDXL's, `sdtrain.models.sdxl.TokenizerPair`). A
    multi-vector textual-inversion token is spelled out first (`expand_vectors`)."""
    if hasattr(tokenizer, "two"):  # SDXL: both tokenizers' ids, each padded its own way
        return torch.stack([tokenize(t, texts) for t in tokenizer], dim=1)
    texts = [texts] if isinstance(texts, str) else list(texts)
    return tokenizer(
        [expand_vectors(tokenizer, t) for t in texts],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def expand_vectors(tokenizer, text: str) -> str:
    """`text` with each multi-vector token `tok` written as `tok tok_1 … tok_{n-1}`, the tokens
    its n embedding rows have: what diffusers' pipelines do to a prompt
    (`TextualInversionLoaderMixin.maybe_convert_prompt`), so captions train as prompts sample.
    A tokenizer without such tokens returns `text` as it is, untokenized."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    if not any(f"{token}_1" in added for token in added):
        return text
    for token in set(tokenizer.tokenize(text)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement, i = f"{replacement} {token}_{i}", i + 1
            text = text.replace(token, replacement)
    return text
