"""Exponential moving average of the trainable weights: an fp32 shadow the module owns.

The module holds one `EMA` (`StableDiffusionModule.ema`), updates it once per optimizer step, saves
it through the checkpoint schema and swaps it in with `module.ema_weights()` for sampling, export
and validation. Nothing else reaches into it.

Why not a library class: diffusers' `EMAModel` keys its shadow by parameter position (a checkpoint
cannot be checked against the U-Net's names) and keeps the parameters' dtype; Lightning's
`WeightAveraging` deep-copies the whole LightningModule (the frozen VAE and text encoder too) and is
a callback, so the module cannot scope itself; torch's `AveragedModel` copies the whole module too.
This class keeps only the trainable parameters, in fp32, by name. Under FSDP2 the parameters are
DTensor shards, so `detach().float().clone()` makes a per-shard shadow with no gather.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sdtrain.training import sharding

# Parameters smaller than this are updated together (foreach) under a device weight: SD-1.5's
# U-Net has 406 of its 686 below it, 0.05% of its weights (measured in docs/benchmarks.md).
SMALL = 1 << 16


def ema_decay(step: int, max_decay: float, warmup: bool) -> float:
    """Decay for the `step`-th update (0-based).

    With warm-up the decay starts small and rises as (1 + n) / (10 + n), so early averages are not
    dominated by the random initial weights; it is capped at `max_decay` (0.9999 ~ a 10k-step
    window).
    """
    if not warmup:
        return max_decay
    return min(max_decay, (1 + step) / (10 + step))


class EMA:
    """fp32 shadow of named parameters; `update()` moves it toward them.

    Args:
        decay: the decay cap.
        warmup: ramp the decay up from 0.1 (see `ema_decay`).
        update_every: update every this many optimizer steps (decay applied once per update).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.ema.decay={decay} is not in (0, 1)")
        if update_every < 1:
            raise ValueError(f"model.ema.update_every={update_every} must be >= 1")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.shadow: dict[str, torch.Tensor] | None = None
        self.num_updates = 0
        self.last_step: int | None = None  # the optimizer step of the last update
        self._swapped = False  # within swapped_in: the shadow holds the raw weights

    def attach(self, params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Start averaging these (name, parameter) pairs, or check a restored shadow against them.

        A fresh shadow copies the parameters (fp32); a shadow loaded from a checkpoint must name
        the same parameters, and moves to their device.
        """
        params = dict(params)
        if self.shadow is None:
            self.shadow = {k: p.detach().float().clone() for k, p in params.items()}
        else:
            if self.shadow.keys() != params.keys():
                extra = sorted(self.shadow.keys() - params.keys())[:3]
                lacking = sorted(params.keys() - self.shadow.keys())[:3]
                raise KeyError(
                    "EMA state in the checkpoint does not match the trainable parameters "
                    f"(only in the checkpoint: {extra}; only in the model: {lacking})"
                )
            # a whole tensor from a checkpoint goes where its parameter is: under FSDP, sharded
            self.shadow = {k: sharding.like(v.float(), params[k]) for k, v in self.shadow.items()}

    @torch.no_grad()
    def update(
        self,
        params: Iterable[tuple[str, torch.nn.Parameter]],
        step: int,
        keep: torch.Tensor | None = None,
    ) -> None:
        """shadow <- d * shadow + (1 - d) * params, with d from `ema_decay`.

        keep: a 0-d tensor on the device, 0.0 to leave the shadow as it is (a step skipped on the
        device, `sdtrain.training.nonfinite`) or 1.0, read by the kernels, not by the host (no sync)."""
        if self._swapped:
            raise RuntimeError(
                "EMA.update inside swapped_in: the shadow holds the raw weights there"
            )
        d = ema_decay(self.num_updates, self.decay, self.warmup)
        params = dict(params)
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        new = [params[n].detach().float() for n in names]
        if keep is None:
            torch._foreach_lerp_(shadow, new, 1.0 - d)
        else:  # foreach lerp takes only a host weight; lerp_ takes a device one, a tensor a call
            weight = keep.to(shadow[0].device) * (1.0 - d)
            few_shadow, few_new = [], []
            for s, p in zip(shadow, new, strict=True):
                if s.numel() >= SMALL:
                    s.lerp_(p, weight)  # in place, one pass: no temporary as large as the weights
                else:
                    few_shadow.append(s)
                    few_new.append(p)
            if few_shadow:  # the many small ones (biases, norms): a few kernels, not one each
                delta = torch._foreach_sub(few_new, few_shadow)
                torch._foreach_mul_(delta, weight)
                torch._foreach_add_(few_shadow, delta)
        self.num_updates += 1
        self.last_step = step

    @contextmanager
    def swapped_in(self, params: Iterable[tuple[str, torch.nn.Parameter]]) -> Iterator[None]:
        """The shadow's values in the parameters within the scope, the exact previous values after.

        A parameter of the shadow's dtype trades values with it in place, one tensor at a time
        (`_trade`), so the scope costs one tensor's worth of memory at most, not a copy of every
        trainable weight (~3.4 GB for SD-1.5's U-Net in fp32). One of another dtype (bf16 weights)
        gets the shadow copied in over a saved copy of its own values. Within the scope the shadow
        holds the raw values: the EMA cannot be updated there.
        """
        params = dict(params)
        self._swapped = True
        traded = {k for k, p in params.items() if p.dtype == self.shadow[k].dtype}
        backup = {k: p.detach().clone() for k, p in params.items() if k not in traded}
        with torch.no_grad():
            for k, p in params.items():
                _trade(p, self.shadow[k]) if k in traded else p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    _trade(p, self.shadow[k]) if k in traded else p.copy_(backup[k])
            self._swapped = False

    def state_dict(self, gather: bool = True, writes: bool = True) -> dict[str, Any]:
        """gather: whole tensors (under FSDP each shard is gathered: a collective, call on every
        rank); False keeps FSDP's shards as they are, for a sharded checkpoint (no full copy).
        writes: whether this rank writes the checkpoint (rank 0 of a whole-file save). A rank that
        does not takes part in the gathers and keeps nothing: no host copy of the EMA (~3.4 GB
        for SD-1.5's U-Net) on every rank."""
        shadow = None
        if self.shadow is not None and gather and not writes:
            for v in self.shadow.values():
                sharding.full(v)  # the collective, if any; the value is not kept
        elif self.shadow is not None and gather:
            shadow = {k: sharding.full(v).cpu() for k, v in self.shadow.items()}
        elif self.shadow is not None:
            shadow = dict(self.shadow)
        return {
            "shadow": shadow,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved EMA. Loaded before `attach` (the usual order), the shadow is placed there;
        loaded after it (FSDP restores after the model is sharded), it is placed like the
        attached shadow at once."""
        attached, self.shadow = self.shadow, state["shadow"]
        if attached is not None and self.shadow is not None:
            self.attach(attached.items())
        self.num_updates = int(state["num_updates"])
        self.last_step = state.get("last_step")


def _trade(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the values of two tensors of one dtype in place, through one temporary."""
    tmp = a.detach().clone()
    a.copy_(b)
    b.copy_(tmp)
