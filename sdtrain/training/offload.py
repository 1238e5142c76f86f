"""The frozen VAE and text encoder(s) kept off the GPU between steps (`model.offload_frozen`).

On a latent cache (`data=latents`) the training step never runs the VAE; when the cache holds the
text conditioning too (`sdtrain-cache-latents --text`) and the text encoder is frozen, it never
runs the text encoder(s) either. Only the rounds between steps do: sampling
(`callbacks.sample_images`), the image metrics and the validation loss on held-out images. So
those parts wait in host memory and come to the GPU for a round only; the step's memory holds
the U-Net, its gradients, optimizer state and activations alone. In fp32, as they load: SD-1.5's
VAE 0.33 GB + CLIP ViT-L 0.49 GB; SDXL's VAE 0.33 GB + both encoders 3.27 GB.

How: in `configure_model`, before Lightning's strategy moves the module to its device, an
offloaded part is taken out of the module's registered submodules (it stays `module.vae` /
`module.text_encoder`), so the strategy's `.to(device)`, DDP's broadcast of the module state and
the checkpoint's `state_dict` never see it (checkpoints never held the frozen parts: they reload
from `run.pretrained`). The precision plugin's conversion (bf16-true) is applied to it as
Lightning applies it to the rest. `frozen_on_device()` copies it to the module's device for a
round and, after it, points it back at its host tensors (unchanged: the part is frozen, so no
copy back) and gives the freed blocks back to the driver. Host tensors are pinned where CUDA is,
so the copy in is asynchronous and at full PCIe speed.

Modes: `auto` (the default) offloads each part the data makes needless: the VAE on a latent
cache, the text encoder(s) too when the cache holds the text conditioning and they do not train
(LoRA on the text encoder and textual inversion train it). `true` does the same, and refuses data
that is no latent cache. `false` keeps everything on the device as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PARTS = ("vae", "text_encoder")  # the module's attribute names of the frozen parts
KEY = "model.offload_frozen"


def check_mode(mode: Any) -> bool | str:
    """`model.offload_frozen` as "auto", True or False (YAML's true/false, or the strings)."""
    text = str(mode).lower()
    if isinstance(mode, bool) or text in ("true", "false"):
        return mode if isinstance(mode, bool) else text == "true"
    if text == "auto":
        return "auto"
    raise ValueError(f"{KEY}={mode!r} must be auto, true or false")


def plan(mode: bool | str, cache_info: dict | None, text_encoder_trains: bool) -> tuple[str, ...]:
    """The parts to keep off the device: none, ("vae",) or ("vae", "text_encoder").

    Args:
        mode: "auto", True or False (`check_mode`).
        cache_info: the datamodule's `latent_cache_info` (the cache's cache.json; None for image
            shards): its "text" says whether it holds the text conditioning.
        text_encoder_trains: the text encoder trains (fully, LoRA or new tokens): never offloaded.
    """
    if mode is False:
        return ()
    if cache_info is None:
        if mode is True:
            raise ValueError(
                f"{KEY}=true keeps the VAE (and the text encoder) off the GPU between steps, "
                "which needs a latent cache (data=latents data.train_shards=<sdtrain-cache-latents "
                "output>; made with --text for the text encoder too); this run's data holds "
                f"images, which the step encodes: set {KEY}=auto or false"
            )
        return ()
    if cache_info.get("text") and not text_encoder_trains:
        return PARTS
    return ("vae",)


def _tensors(part: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owner, "param" or "buffer", name, tensor) of every parameter and buffer in `part`."""
    found = []
    for owner in part.modules():
        for key, p in owner._parameters.items():
            if p is not None:
                found.append((owner, "param", key, p.data))
        for key, b in owner._buffers.items():
            if b is not None:
                found.append((owner, "buffer", key, b))
    return found


def _point_at(saved: list[tuple[nn.Module, str, str, torch.Tensor]]) -> None:
    """Make each parameter and buffer the tensor `_tensors` recorded (no copy)."""
    for owner, kind, key, tensor in saved:
        if kind == "param":
            owner._parameters[key].data = tensor
        else:
            owner._buffers[key] = tensor


class FrozenOffload:
    """Which frozen parts wait off the device, and the scope that brings them in.

    Args:
        mode: `model.offload_frozen`: "auto", true or false (see the module docstring).
    """

    def __init__(self, mode: bool | str = "auto") -> None:
        self.mode = check_mode(mode)
        self.parts: dict[str, nn.Module] = {}  # name -> part kept in host memory between rounds
        self.inside: set[str] = set()  # of those, the ones on the device now (within a round)
        self._warned = False

    def detach(self, module: nn.Module, names: Sequence[str], precision: Any = None) -> None:
        """Take `names` out of `module`'s submodules (still its attributes), in host memory,
        converted as `precision` (Lightning's precision plugin) converts the module."""
        for name in names:
            part = module._modules.pop(name)
            module.__dict__[name] = part  # `module.vae` still; no longer moved, cast or saved
            part.to("cpu")
            if precision is not None:
                part = precision.convert_module(part) or part
            if torch.cuda.is_available():  # the copy in is then asynchronous, and twice as fast
                part._apply(lambda t: t.pin_memory())
            self.parts[name] = part

    def placement(self) -> dict[str, str]:
        """Each offloaded part's place now: "host" (between rounds) or "device" (in a round)."""
        return {n: "device" if n in self.inside else "host" for n in self.parts}

    @contextmanager
    def brought_in(
        self, device: torch.device, names: Sequence[str] | None = None, why: str | None = None
    ) -> Iterator[list[str]]:
        """Within the scope, the offloaded parts `names` (None: all) are on `device`; after it,
        back in host memory as they were. Yields the names it moved (none already in: nested
        scopes move nothing). `why` set: warn once that a training step needed a part."""
        moved = [n for n in (names or list(self.parts)) if n in self.parts and n not in self.inside]
        saved = {n: _tensors(self.parts[n]) for n in moved}
        for n in moved:
            self.parts[n].to(device, non_blocking=True)  # from pinned memory: asynchronous
            self.inside.add(n)
        if moved and why and not self._warned:
            self._warned = True
            log.warning("%s: %s needed %s, brought in for it and back", KEY, why, moved)
        try:
            yield moved
        finally:
            for n in moved:
                _point_at(saved[n])  # the host tensors, unchanged: a frozen part is not copied back
                self.inside.discard(n)
            if moved and torch.device(device).type == "cuda":
                torch.cuda.empty_cache()  # its blocks back to the driver, not kept by the cache


class Offloading:
    """A mixin of `sdtrain.training.module.StableDiffusionModule`: reads its `offload`
    (a `FrozenOffload`), `_trainer`, `text_encoder_trains` and `device`."""

    offload: FrozenOffload

    def offload_frozen_parts(self) -> None:
        """Keep the parts the data makes needless off the device (`configure_model`, before the
        strategy moves the module there)."""
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None)
        info = getattr(dm, "latent_cache_info", None)
        names = plan(self.offload.mode, info, self.text_encoder_trains)
        precision = getattr(trainer, "precision_plugin", None)
        self.offload.detach(self, names, precision)
        if names and (trainer is None or trainer.is_global_zero):
            log.info("%s: %s kept in host memory between sampling/validation rounds", KEY, names)

    def frozen_on_device(
        self, names: Sequence[str] | None = None, why: str | None = None
    ) -> Iterator[list[str]]:
        """A scope with the offloaded frozen parts `names` (None: all) on the module's device:
        sampling, image-metric and validation rounds run in it (`FrozenOffload.brought_in`)."""
        return self.offload.brought_in(self.device, names, why)
