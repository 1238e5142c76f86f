"""LoRA through peft, and what trains besides the U-Net: a loader wrapper and the module's helpers.

`load_parts` wraps `sdtrain.models.loader.load_parts` (the `model.parts` loader): with `model.lora` set it
freezes the U-Net's base weights and adds peft LoRA adapters to its attention projections (and to
the text encoder's with `model.lora.text_encoder=true`), the way diffusers' own
train_text_to_image_lora.py does (`unet.add_adapter(LoraConfig(...))`). SDXL's text encoder is a
pair (`sdtrain.models.sdxl.TextEncoderPair`): each of its encoders gets adapters of its own, both
with `true` or the one named with `te1` / `te2` (`model.train_text_encoder` picks the same way).
With `model.textual_inversion` set it adds new tokens whose embedding rows alone train
(`sdtrain.models.textual_inversion`). The module then trains whatever requires grad; the helpers
below say what that is, name it for checkpoints and the EMA, and split it into optimizer groups
(the text encoder's own LR).

Names: U-Net parameters keep their bare names (`conv_in.weight`, or with LoRA
`...attn1.to_q.lora_A.default.weight`), text-encoder parameters are `text_encoder.`-prefixed
(SDXL's `text_encoder.te1.…` / `text_encoder.te2.…`), so the EMA shadow of a U-Net-only run is
keyed as it always was.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from sdtrain.models import lora_family
from sdtrain.models import textual_inversion as ti
from sdtrain.models.parts import Parts

TEXT_PREFIX = "text_encoder."  # text-encoder names in trainable_parameters, the EMA and checkpoints
UNET_PREFIX = (
    "unet."  # the U-Net's prefix in Lightning's state_dict (as sdtrain.artifacts.checkpoint)
)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention projections
# model.lora's keys: these and the LoRA family's (`sdtrain.models.lora_family`: type, dora, ...)
BASE_KEYS = ("rank", "alpha", "target_modules", "text_encoder", "text_encoder_target_modules")
KEYS = (*BASE_KEYS, *lora_family.KEYS)


def load_parts(
    lora: dict[str, Any] | None = None,
    textual_inversion: dict[str, Any] | None = None,
    **loader_args: Any,
) -> Parts:
    """`sdtrain.models.loader.load_parts(**loader_args)`, with LoRA adapters added when `lora` is
    set and new tokens when `textual_inversion` is.

    Args:
        lora: `model.lora` (keys `KEYS`, see `add_lora`); None trains the whole U-Net as before.
        textual_inversion: `model.textual_inversion` (`sdtrain.models.textual_inversion.KEYS`):
            new tokens whose embeddings alone train (the U-Net too with its `train_unet`).
        loader_args: the arguments of `sdtrain.models.loader.load_parts`.
    """
    from sdtrain.models.loader import load_parts as load

    if lora and loader_args.get("unet_config") is not None:
        raise ValueError(
            "model.lora adapts the pretrained U-Net, whose weights checkpoints do not keep: "
            "set model.unet_config=null"
        )
    parts = load(**loader_args)
    if lora:
        unknown = sorted(set(lora) - set(KEYS))
        if unknown:
            raise ValueError(f"model.lora.{unknown[0]}: no such key; model.lora takes {KEYS}")
        add_lora(parts, **lora)
    if textual_inversion:
        if lora and lora.get("text_encoder"):
            raise ValueError(
                f"model.lora.text_encoder={lora['text_encoder']} and model.textual_inversion: pick "
                "one (adapters on the text encoder change what the new tokens' embeddings mean)"
            )
        ti.add_textual_inversion(parts, **ti.check(textual_inversion))
    return parts


def add_lora(
    parts: Parts,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Iterable[str] = UNET_TARGETS,
    text_encoder: bool | str = False,
    text_encoder_target_modules: Iterable[str] = TEXT_TARGETS,
    type: str = "lora",
    **options: Any,
) -> Parts:
    """Freeze the U-Net (and text encoder) base weights and add trainable adapters, in place.

    Args:
        rank: the adapters' rank r (4-128 is usual; parameters grow linearly with it).
        alpha: the update is scaled by alpha / rank; None: alpha = rank (scale 1).
        target_modules: U-Net module names (suffixes) that get adapters.
        text_encoder: add adapters to the text encoder too (`true`: to both of SDXL's; `te1` /
            `te2`: to that one of SDXL's only; see `picked`).
        text_encoder_target_modules: text-encoder module names that get adapters.
        type: `lora`, `locon`, `loha` or `lokr` (`sdtrain.models.lora_family`).
        options: the type's own keys (`lora_family.OPTIONS`: dropout and dora for LoRA / LoCon,
            conv_target_modules, LoHa / LoKr's rank_dropout, ...); a ValueError names any the
            type does not take.
    """
    if int(rank) < 1:
        raise ValueError(f"model.lora.rank={rank} must be >= 1")
    options = lora_family.check(type, **options)
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if not 0.0 <= options.get(key, 0.0) < 1.0:
            raise ValueError(f"model.lora.{key}={options[key]} is not in [0, 1)")
    alpha = float(rank if alpha is None else alpha)
    parts.unet.requires_grad_(False)
    unet_targets = [*target_modules, *options.get("conv_target_modules", [])]
    config = lora_family.peft_config(type, rank, alpha, unet_targets, **options)
    _adapt(parts.unet, config, "model.lora.target_modules")
    chosen = picked(parts.text_encoder, text_encoder, "model.lora.text_encoder")
    if chosen:
        parts.text_encoder.requires_grad_(False)
    where = "model.lora.text_encoder_target_modules"
    for name in chosen:
        model = encoders(parts.text_encoder)[name]
        text = lora_family.peft_config(
            type, rank, alpha, list(text_encoder_target_modules), **options
        )
        _adapt(model, text, where)
    return parts


def encoders(model) -> dict[str, torch.nn.Module]:
    """The models inside `model` that take adapters of their own, by their parameters' prefix:
    SDXL's pair of text encoders `{"te1": …, "te2": …}`; any other model `{"": model}`."""
    from sdtrain.models.sdxl import TextEncoderPair

    if isinstance(model, TextEncoderPair):
        return {"te1": model.te1, "te2": model.te2}
    return {"": model}


def picked(text_encoder, value: Any, key: str) -> list[str]:
    """The names (`encoders`) of the text encoders `value` picks: all for true, none for false,
    SDXL's `te1` or `te2` alone; a ValueError naming `key` for anything else."""
    names = list(encoders(text_encoder))
    if value is True or value is False or value is None:
        return names if value else []
    if value in ("te1", "te2") and value in names:
        return [value]
    if value in ("te1", "te2"):
        raise ValueError(
            f"{key}={value}: te1 and te2 name one of SDXL's two text encoders; this model has "
            "one text encoder: set true or false"
        )
    raise ValueError(
        f"{key}={value!r}: takes true, false, te1 or te2 (te1 / te2: one of SDXL's two text "
        "encoders alone)"
    )


def _adapt(model, config, where: str) -> None:
    """Add the adapters of peft `config`: to the U-Net through diffusers' `add_adapter`, to a text
    encoder through peft's `inject_adapter_in_model` (what transformers' `add_adapter` calls,
    without its peft version gate: transformers 5 asks for peft >= 0.22)."""
    from peft import inject_adapter_in_model

    try:
        if hasattr(model, "fuse_lora"):  # diffusers' PeftAdapterMixin
            model.add_adapter(config)
        else:
            inject_adapter_in_model(config, model)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        targets = sorted(config.target_modules)
        raise ValueError(f"{where}={targets}: {str(e).splitlines()[0]}") from e


def has_adapter(model) -> bool:
    """Whether peft adapters were added to this diffusers or transformers model (to either
    encoder of SDXL's pair)."""
    return any(getattr(m, "peft_config", None) for m in encoders(model).values())


def describe(unet, text_encoder) -> dict[str, Any] | None:
    """The LoRA settings of these models as `model.lora` takes them (plain types, for the
    checkpoint's run metadata, so export can rebuild the adapters); None without LoRA."""
    if not has_adapter(unet):
        return None
    cfg = unet.peft_config["default"]
    models = encoders(text_encoder)
    adapted = [name for name, model in models.items() if has_adapter(model)]
    text = models[adapted[0]].peft_config["default"] if adapted else None
    return lora_family.describe(cfg, unet) | {
        "target_modules": sorted(cfg.target_modules),  # the conv targets of LoCon among them
        "conv_target_modules": [],
        # true (all of them), false, or SDXL's te1 / te2 alone
        "text_encoder": adapted[0] if 0 < len(adapted) < len(models) else bool(adapted),
        "text_encoder_target_modules": sorted(text.target_modules) if text else list(TEXT_TARGETS),
    }


def set_text_encoder_training(text_encoder, full: bool | str) -> bool:
    """Freeze the text encoder unless it trains; return whether (any of) it trains.

    It trains fully with `full` (model.train_text_encoder: true, or SDXL's te1 / te2 alone), or
    its LoRA adapters train when the loader added them, or the embedding rows of new tokens
    (`sdtrain.models.textual_inversion`); otherwise every weight is frozen, as before. One of
    SDXL's encoders may train fully and the other through adapters.
    """
    models = encoders(text_encoder)
    chosen = picked(text_encoder, full, "model.train_text_encoder")
    added = ti.embeddings(text_encoder)
    if chosen and added:
        raise ValueError(
            f"model.train_text_encoder={full} and model.textual_inversion: pick one (a text "
            "encoder that trains whole changes what the new tokens' embeddings mean)"
        )
    adapted = [name for name, model in models.items() if has_adapter(model)]
    if set(chosen) & set(adapted):
        full_is, lora_is = (("true" if len(n) == len(models) else n[0]) for n in (chosen, adapted))
        raise ValueError(
            f"model.train_text_encoder={full_is} and model.lora.text_encoder={lora_is}: pick one "
            "(full fine-tuning of a text encoder, or LoRA adapters on it)"
        )
    for name, model in models.items():
        if name in chosen:
            model.requires_grad_(True)
        elif not has_adapter(model):
            model.requires_grad_(False)
    for table in added.values():
        table.added.requires_grad_(True)
    return bool(chosen) or has_adapter(text_encoder) or bool(added)


def trainable(unet, text_encoder) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of everything that trains: U-Net names bare, text encoder's prefixed."""
    yield from ((n, p) for n, p in unet.named_parameters() if p.requires_grad)
    for n, p in text_encoder.named_parameters():
        if p.requires_grad:
            yield f"{TEXT_PREFIX}{n}", p


def param_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]], text_encoder_lr: float | None
) -> list[Any]:
    """The optimizer's params: a plain list when only the U-Net trains (as before), else a U-Net
    group (none when it is frozen: textual inversion) and a text-encoder group with
    `text_encoder_lr` (None: the optimizer's lr)."""
    unet, text = [], []
    for name, p in named:
        (text if name.startswith(TEXT_PREFIX) else unet).append(p)
    if not text:
        return unet
    group: dict[str, Any] = {"params": text, "name": "text_encoder"}
    if text_encoder_lr is not None:
        group["lr"] = float(text_encoder_lr)
    return [{"params": unet, "name": "unet"}, group] if unet else [group]


def checkpoint_keys(unet, text_encoder) -> set[str]:
    """The state_dict keys a checkpoint keeps: every `unet.` weight of a fully trained U-Net, only
    the adapters of a LoRA one (the base reloads from the model folder), none of a frozen one
    (textual inversion), and the text encoder's weights that train."""
    trains = {f"{UNET_PREFIX}{n}" for n, p in unet.named_parameters() if p.requires_grad}
    if has_adapter(unet) or not trains:
        keys = trains
    else:
        keys = {f"{UNET_PREFIX}{k}" for k in unet.state_dict()}
    text = text_encoder.named_parameters()
    return keys | {f"{TEXT_PREFIX}{n}" for n, p in text if p.requires_grad}


def add_recorded(parts: Parts, recorded: dict[str, Any] | None) -> Parts:
    """The adapters a checkpoint's run trained (`describe`, in its run metadata), to load into."""
    return add_lora(parts, **recorded) if recorded else parts


def load_text_encoder(text_encoder, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load a trained text encoder's weights (full, its adapters, or new tokens' rows; names
    without the prefix)."""
    partly = has_adapter(text_encoder) or bool(ti.embeddings(text_encoder))  # the rest: as loaded
    if not weights and not partly:
        return  # it was frozen
    missing, unexpected = text_encoder.load_state_dict(weights, strict=False)
    trained = {n for n, p in text_encoder.named_parameters() if p.requires_grad}
    lacking = sorted(trained & set(missing)) if partly else []
    if unexpected or lacking:
        bad = (unexpected or lacking)[0]
        raise KeyError(f"{where}: text-encoder weights do not fit the model ({bad})")


def fuse(model) -> None:
    """Merge LoRA adapters into the base weights and drop them: a plain model to save_pretrained
    (each of SDXL's text encoders that has them)."""
    if not has_adapter(model):
        return
    if hasattr(model, "fuse_lora"):  # diffusers' U-Net
        model.fuse_lora()
        model.unload_lora()
        return
    from diffusers.utils import recurse_remove_peft_layers  # what unload_lora calls
    from peft.tuners.tuners_utils import BaseTunerLayer

    for encoder in encoders(model).values():
        if not has_adapter(encoder):
            continue
        for module in encoder.modules():  # a text encoder: peft's own merge, then its base layers
            if isinstance(module, BaseTunerLayer):
                module.merge()
        recurse_remove_peft_layers(encoder)
        del encoder.peft_config
