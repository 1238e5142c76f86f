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

`device="cpu"` keeps the shadow in host memory (pinned where CUDA is, for asynchronous copies): the
GPU then holds no EMA (4 bytes per trainable weight: 3.4 GB for SD-1.5's U-Net, 10.3 GB for SDXL's),
and each update copies the weights down a chunk at a time through two pinned buffers, the next
chunk's copy running while the CPU averages this one. With `update_every` N the copies and the CPU's
work come once per N steps.
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
# Elements per chunk of a host-held shadow's update (64 MB of fp32 per pinned staging buffer; a
# larger parameter gets a buffer of its size): two such buffers is all the extra host memory.
CHUNK = 1 << 24


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
        device: where the shadow lives: None, the weights' device; "cpu" keeps it in host memory
            (pinned under CUDA), off the GPU. Checkpoints are the same either way.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        update_every: int = 1,
        device: str | None = None,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.ema.decay={decay} is not in (0, 1)")
        if update_every < 1:
            raise ValueError(f"model.ema.update_every={update_every} must be >= 1")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.device = None if device is None else torch.device(device)
        self.shadow: dict[str, torch.Tensor] | None = None
        self.num_updates = 0
        self.last_step: int | None = None  # the optimizer step of the last update
        self._swapped = False  # within swapped_in: the shadow holds the raw weights

    def attach(self, params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Start averaging these (name, parameter) pairs, or check a restored shadow against them.

        A fresh shadow copies the parameters (fp32); a shadow loaded from a checkpoint must name
        the same parameters, and moves to their device (or to `device`).
        """
        params = dict(params)
        if self.device is not None and any(hasattr(p, "device_mesh") for p in params.values()):
            raise ValueError(
                f"model.ema.device={self.device} with trainer=fsdp: FSDP already shards the EMA "
                "over the GPUs; leave model.ema.device=null"
            )
        if self.shadow is None and self.device is not None:
            self.shadow = {k: self._host(p.detach(), p) for k, p in params.items()}
        elif self.shadow is None:
            self.shadow = {k: p.detach().float().clone() for k, p in params.items()}
        else:
            if self.shadow.keys() != params.keys():
                extra = sorted(self.shadow.keys() - params.keys())[:3]
                lacking = sorted(params.keys() - self.shadow.keys())[:3]
                raise KeyError(
                    "EMA state in the checkpoint does not match the trainable parameters "
                    f"(only in the checkpoint: {extra}; only in the model: {lacking})"
                )
            if self.device is not None:
                self.shadow = {k: self._host(v, params[k]) for k, v in self.shadow.items()}
                return
            # a whole tensor from a checkpoint goes where its parameter is: under FSDP, sharded
            self.shadow = {k: sharding.like(v.float(), params[k]) for k, v in self.shadow.items()}

    def _host(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """An fp32 copy of `value` on `device`, pinned when it is the host of a CUDA parameter."""
        pin = self.device.type == "cpu" and param.device.type == "cuda"
        out = torch.empty(value.shape, dtype=torch.float32, device=self.device, pin_memory=pin)
        return out.copy_(value)

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
        if self.device is not None:  # the weights come to the shadow (host) a chunk at a time
            weight = 1.0 - d if keep is None else float(keep) * (1.0 - d)  # a sync: N steps apart
            _lerp_from(self.shadow, params, names, weight)
            self.num_updates += 1
            self.last_step = step
            return
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
        A host-held shadow (`device="cpu"`) trades through non-blocking copies, waited for once.
        """
        params = dict(params)
        self._swapped = True
        traded = {k for k, p in params.items() if p.dtype == self.shadow[k].dtype}
        backup = {k: p.detach().clone() for k, p in params.items() if k not in traded}
        with torch.no_grad():
            for k, p in params.items():
                _trade(p, self.shadow[k]) if k in traded else _copy(p, self.shadow[k])
            _wait(params.values(), self.shadow.values())
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    _trade(p, self.shadow[k]) if k in traded else p.copy_(backup[k])
                _wait(params.values(), self.shadow.values())
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


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, not waiting where one is pinned host memory and the other on a GPU (the
    stream keeps the copies in order; `_wait` before the host reads)."""
    pinned = (src.is_pinned() and dst.is_cuda) or (dst.is_pinned() and src.is_cuda)
    dst.copy_(src, non_blocking=pinned)


def _trade(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the values of two tensors of one dtype in place, through one temporary (on `a`'s
    device: the GPU's when `b` is a host-held shadow)."""
    tmp = a.detach().clone()
    _copy(a, b)
    _copy(b, tmp)  # after the copy above on the same stream; tmp's memory is freed stream-ordered


def _wait(*groups: Iterable[torch.Tensor]) -> None:
    """Wait for the copies queued on the CUDA devices these tensors are on (none: nothing)."""
    for device in {t.device for g in groups for t in g if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()


def _lerp_from(
    shadow: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    names: list[str],
    weight: float,
) -> None:
    """shadow <- lerp(shadow, params, weight) for a shadow held on its own device (the host): the
    parameters come down a chunk (`CHUNK` elements) at a time into two buffers (pinned for a CUDA
    model), the next chunk's copy queued before the CPU averages this one."""
    chunks: list[list[str]] = [[]]
    size = 0
    for n in names:
        if chunks[-1] and size + params[n].numel() > CHUNK:
            chunks.append([])
            size = 0
        chunks[-1].append(n)
        size += params[n].numel()
    longest = max(sum(params[n].numel() for n in c) for c in chunks)
    device = next(iter(shadow.values())).device
    pin = device.type == "cpu" and any(p.is_cuda for p in params.values())
    buffers = [torch.empty(longest, device=device, pin_memory=pin) for _ in range(2)]

    def fetch(i: int) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Queue chunk i's copies into its buffer; the event marks when they are done."""
        views, at = [], 0
        for n in chunks[i]:
            p = params[n].detach()
            view = buffers[i % 2][at : at + p.numel()].view(p.shape)
            _copy(view, p)
            views.append(view)
            at += p.numel()
        event = torch.cuda.Event() if pin else None
        if event is not None:
            event.record()
        return views, event

    pending = fetch(0)
    for i, chunk in enumerate(chunks):
        new, event = pending
        if i + 1 < len(chunks):  # its buffer's previous chunk was averaged in the last round
            pending = fetch(i + 1)
        if event is not None:
            event.synchronize()
        torch._foreach_lerp_([shadow[n] for n in chunk], new, weight)
