"""Textual inversion (Gal et al. 2022): new tokens whose embeddings alone train.

`model.textual_inversion: {tokens: ["<my-thing>"], init_word: "*", vectors: 1, train_unet: false}`
adds each token (and, for `vectors: n > 1`, `<my-thing>_1` ... `<my-thing>_{n-1}`, the names
diffusers' `load_textual_inversion` gives a multi-vector embedding) to the tokenizer, and to the
text encoder a table of their embeddings, each row a copy of the init word's embedding. SDXL's
two tokenizers and two text encoders get them alike (768- and 1280-wide rows).

The new rows are a parameter of their own (`AddedTokens.added`, (rows, D)) beside the frozen
vocabulary table, not a gradient mask on the whole table: so the optimizer, the EMA and the
checkpoint hold rows x D values (SD-1.5's table is 49408 x 768 = 38 M values, times three under
AdamW's two moments), every other weight stays bit for bit as loaded without restoring it after
each step (AdamW's weight decay moves masked rows unless they are copied back, as diffusers'
textual_inversion.py does), and the rows' names (`text_encoder.embeddings.token_embedding.added`,
SDXL's `text_encoder.te1.…` / `text_encoder.te2.text_model.…`) say what they are. Everything
else freezes, the U-Net too unless `train_unet` (then it trains as configured: whole, or its
LoRA adapters with `model.lora`).

Exports: `embedding_files` gives each token's rows as the `.safetensors` AUTOMATIC1111 and
ComfyUI load (`emb_params` for SD-1.x/2.x; `clip_l` and `clip_g` for SDXL) and diffusers'
`load_textual_inversion` reads; `merge` turns the table into a plain larger one for a diffusers
folder whose tokenizer holds the tokens; `drop` leaves the original table (a single file).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

WHERE = "model.textual_inversion"
KEYS = ("tokens", "init_word", "vectors", "train_unet")
# The key of each encoder's rows in an embedding file: SD's one encoder; SDXL's CLIP ViT-L (te1)
# and OpenCLIP ViT-bigG (te2), named as AUTOMATIC1111's and ComfyUI's SDXL embeddings name them
FILE_KEYS = {"": "emb_params", "te1": "clip_l", "te2": "clip_g"}


class AddedTokens(torch.nn.Module):
    """A token-embedding table of the frozen vocabulary (`base`) and trainable rows for the
    tokens added after it (`added`, ids `first` … `first + rows - 1`).

    Args:
        base: the text encoder's own token embedding (nn.Embedding), frozen.
        first: the id of the first added token.
        init: (rows, D) the added rows' starting values.
        names: each row's token (multi-vector tokens: `tok`, `tok_1`, ...).
        encoder: which encoder's table it is: "" (SD), "te1" or "te2" (SDXL's pair).
        settings: `model.textual_inversion` as given (plain types; checkpoints record it).
    """

    def __init__(
        self,
        base: torch.nn.Embedding,
        first: int,
        init: torch.Tensor,
        names: list[str],
        encoder: str = "",
        settings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.first = int(first)
        self.added = torch.nn.Parameter(init.detach().clone().to(base.weight.dtype))
        self.names, self.encoder = list(names), encoder
        self.settings = dict(settings or {})

    @property
    def num_embeddings(self) -> int:
        return max(self.base.num_embeddings, self.first + len(self.names))

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, (num_embeddings, D): the vocabulary's rows, then the added ones."""
        table = self.base.weight.new_zeros(self.num_embeddings, self.embedding_dim)
        table[: self.base.num_embeddings] = self.base.weight
        table[self.first : self.first + len(self.names)] = self.added.to(table.dtype)
        return table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D): an added row where the id is a new token's, else the base's."""
        offset = input_ids - self.first
        new = (offset >= 0) & (offset < len(self.names))
        rows = self.base(torch.where(new, 0, input_ids))
        added = F.embedding(offset.clamp(0, len(self.names) - 1), self.added)
        return torch.where(new.unsqueeze(-1), added.to(rows.dtype), rows)

    def extra_repr(self) -> str:
        return f"first={self.first}, names={self.names}"


def check(settings: dict[str, Any]) -> dict[str, Any]:
    """`model.textual_inversion` with its defaults filled in, or a ValueError naming the key."""
    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        raise ValueError(f"{WHERE}.{unknown[0]}: no such key; {WHERE} takes {KEYS}")
    s = {"vectors": 1, "train_unet": False} | dict(settings)
    tokens = [s["tokens"]] if isinstance(s.get("tokens"), str) else s.get("tokens")
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError(
            f"{WHERE}.tokens={tokens!r}: give a list of new tokens, e.g. ['<my-thing>']"
        )
    init = s.get("init_word")
    if not isinstance(init, str) or not init.strip():
        raise ValueError(
            f"{WHERE}.init_word={init!r}: give the word whose embedding the new tokens start from "
            "(e.g. dog, sculpture, or * for no meaning)"
        )
    vectors = s["vectors"]
    if not isinstance(vectors, int) or isinstance(vectors, bool) or vectors < 1:
        raise ValueError(f"{WHERE}.vectors={vectors!r} must be a whole number >= 1")
    if not isinstance(s["train_unet"], bool):
        raise ValueError(f"{WHERE}.train_unet={s['train_unet']!r} must be true or false")
    return s | {"tokens": list(tokens)}


def row_names(tokens: list[str], vectors: int) -> list[str]:
    """Every added token, in row order: each token and its `tok_1` … `tok_{vectors-1}`."""
    return [t if i == 0 else f"{t}_{i}" for t in tokens for i in range(vectors)]


def encoders(text_encoder) -> list[tuple[str, Any]]:
    """(name, encoder) of each text encoder: SD's one (""), or SDXL's te1 and te2."""
    if hasattr(text_encoder, "te1"):  # sdtrain.models.sdxl.TextEncoderPair
        return [("te1", text_encoder.te1), ("te2", text_encoder.te2)]
    return [("", text_encoder)]


def pairs(text_encoder, tokenizer) -> list[tuple[str, Any, Any]]:
    """(name, encoder, tokenizer) of each text encoder and its tokenizer."""
    tokenizers = [tokenizer.one, tokenizer.two] if hasattr(tokenizer, "two") else [tokenizer]
    return [(n, m, t) for (n, m), t in zip(encoders(text_encoder), tokenizers, strict=True)]


def _check_tokens(tokenizer, tokens: list[str], names: list[str]) -> None:
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"{WHERE}.tokens: {token!r} must be one word without spaces")
        if token != token.lower():
            raise ValueError(
                f"{WHERE}.tokens: {token!r} has capitals; CLIP lower-cases captions, so write it "
                f"as {token.lower()!r}"
            )
    for name in names:
        pieces = tokenizer.tokenize(name)
        if name in vocab or (len(pieces) == 1 and pieces[0] in vocab):
            raise ValueError(
                f"{WHERE}.tokens: {name!r} is already in the tokenizer's vocabulary (id "
                f"{vocab.get(name, vocab.get(pieces[0]))}), so captions would lose that word: "
                "pick a string of its own, e.g. '<my-thing>'"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"{WHERE}.tokens names {repeated[0]!r} twice (with vectors > 1 each token also takes "
            "tok_1, tok_2, ...)"
        )


def _init_ids(tokenizer, init_word: str, vectors: int) -> list[int]:
    """The ids whose rows start the new ones: one id (copied to every vector) or one per vector."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if len(ids) == 1 or len(ids) == vectors:
        return ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    raise ValueError(
        f"{WHERE}.init_word={init_word!r} is {len(ids)} tokens for this tokenizer ({pieces}), not "
        f"one: with {WHERE}.vectors={vectors} it must be one token (copied to every vector) or "
        f"{vectors} (one each); pick a word the tokenizer knows whole, or set vectors={len(ids)}"
    )


def add_textual_inversion(
    parts,
    tokens: list[str],
    init_word: str,
    vectors: int = 1,
    train_unet: bool = False,
):
    """Add the tokens to the tokenizer(s) and their trainable rows to the text encoder(s), each
    starting as the init word's embedding; freeze everything else (the U-Net unless
    `train_unet`). In place; returns `parts`. A ValueError names the key of a bad setting."""
    settings = check(
        {"tokens": tokens, "init_word": init_word, "vectors": vectors, "train_unet": train_unet}
    )
    tokens, names = settings["tokens"], row_names(settings["tokens"], settings["vectors"])
    found = pairs(parts.text_encoder, parts.tokenizer)
    inits = []
    for _, model, tokenizer in found:  # every check before anything changes
        if isinstance(model.get_input_embeddings(), AddedTokens):
            raise ValueError(f"{WHERE}: the text encoder has added tokens already")
        _check_tokens(tokenizer, tokens, names)
        inits.append(_init_ids(tokenizer, init_word, settings["vectors"]))
    parts.text_encoder.requires_grad_(False)
    for (name, model, tokenizer), init_ids in zip(found, inits, strict=True):
        table = model.get_input_embeddings()
        rows = table.weight.detach()[init_ids]  # (1 or vectors, D)
        init = rows.expand(settings["vectors"], -1).repeat(len(tokens), 1)  # (len(names), D)
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        if ids != list(range(ids[0], ids[0] + len(names))) or ids[0] > table.num_embeddings:
            raise ValueError(f"{WHERE}: the tokenizer gave the new tokens ids {ids}, not a run")
        model.set_input_embeddings(AddedTokens(table, ids[0], init, names, name, settings))
        pool_at_eos(model, tokenizer)
    if not settings["train_unet"]:
        parts.unet.requires_grad_(False)
    return parts


def pool_at_eos(model, tokenizer) -> None:
    """Pool at the end-of-text token, not at the highest id (a new token's).

    transformers keeps a config's legacy `eos_token_id: 2` (Stability's SDXL text_encoder_2
    has it) as "pool where the id is highest", which was the end-of-text token until tokens were
    added. AUTOMATIC1111 and ComfyUI pool at the end-of-text token; so does this model now."""
    for module in model.modules():
        if getattr(module, "eos_token_id", None) == 2 and tokenizer.eos_token_id != 2:
            module.eos_token_id = tokenizer.eos_token_id


def embeddings(text_encoder) -> dict[str, AddedTokens]:
    """The added-token tables in `text_encoder` (SDXL: one per encoder), by module name."""
    return {n: m for n, m in text_encoder.named_modules() if isinstance(m, AddedTokens)}


def describe(text_encoder) -> dict[str, Any] | None:
    """`model.textual_inversion` as this text encoder was given it (the checkpoint's run record,
    so export can add the tokens again); None without added tokens."""
    found = list(embeddings(text_encoder).values())
    return dict(found[0].settings) if found else None


def add_recorded(parts, recorded: dict[str, Any] | None):
    """The tokens a checkpoint's run added (`describe`), to load its trained rows into."""
    return add_textual_inversion(parts, **recorded) if recorded else parts


def embedding_files(text_encoder) -> dict[str, dict[str, torch.Tensor]]:
    """Each token's embedding file: {token: {"emb_params": (vectors, 768)}} for SD-1.x,
    {token: {"clip_l": (vectors, 768), "clip_g": (vectors, 1280)}} for SDXL; fp32, on the CPU."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    for table in embeddings(text_encoder).values():
        tokens, n = table.settings["tokens"], table.settings["vectors"]
        rows = table.added.detach().float().cpu()
        for i, token in enumerate(tokens):
            files.setdefault(token, {})[FILE_KEYS[table.encoder]] = rows[
                i * n : (i + 1) * n
            ].clone()
    return files


def file_name(token: str) -> str:
    """An embedding file's name for `token`: the characters a file name takes everywhere
    (`<my-thing>` -> `my-thing.safetensors`; AUTOMATIC1111 triggers it by that name)."""
    stem = re.sub(r"[^\w.-]+", "", token).strip(".")
    if not stem:
        raise ValueError(f"{WHERE}.tokens: {token!r} leaves no file name; add letters to it")
    return f"{stem}.safetensors"


def _replace(text_encoder, table_of) -> None:
    for _, model in encoders(text_encoder):
        current = model.get_input_embeddings()
        if isinstance(current, AddedTokens):
            model.set_input_embeddings(table_of(current, model))


def merge(text_encoder) -> None:
    """Each added-token table as one plain nn.Embedding of the vocabulary and the new rows (the
    text encoder's config says the new size): what a diffusers folder with the tokens saves."""

    def plain(table: AddedTokens, model) -> torch.nn.Embedding:
        weight = table.weight.detach()
        merged = torch.nn.Embedding(*weight.shape, device=weight.device, dtype=weight.dtype)
        merged.weight.data.copy_(weight)
        model.config.vocab_size = weight.shape[0]
        return merged.requires_grad_(False)

    _replace(text_encoder, plain)


def drop(text_encoder) -> None:
    """Put each encoder's own vocabulary table back, without the new rows (a single file keeps
    the original layout; its tokens travel as embedding files)."""
    _replace(text_encoder, lambda table, model: table.base)
