"""CUDA graphs for the compiled U-Net's forward and backward (`model.cuda_graphs`).

With `model.compile` set, the U-Net's compiled regions go through Inductor with its CUDA graphs on
(`torch.compile(mode="reduce-overhead")`: CUDA graph trees). Each region's forward and backward
kernels are recorded once per shape and replayed, so a step launches a few graphs instead of
thousands of kernels: the per-step CPU time of launching goes, which is what limits small batches
and small images. The values are those of the same compiled kernels.

Where graphs cannot be used the run goes on with ordinary launches and says why in one line:
- no CUDA device (the CPU runs the compiled kernels directly), or trainer=fsdp (its gathers and
  reduce-scatters run in hooks around each block);
- gradient accumulation (the backward graph's gradients live in the graphs' memory pool, which
  the next micro-batch's replay reuses before they are summed);
- a compiled region Inductor will not graph (its own reason: a CPU tensor in the graph, a
  mutated input, ...), once per reason;
- batches whose shape changes (`data.buckets`): each shape records its own graphs, which costs
  memory and a recording per shape; said once, with the shapes.

What stays outside the graphs: the step's draws, the loss, the optimizer, clipping and the EMA
(a few fused or foreach kernels each: `sdtrain.training.optimizer_hooks`). Sampling and the
validation loss run the U-Net eagerly (`torch.compiler.set_stance("force_eager")`), as with
compile alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# the logger Inductor's CUDA graph wrapper tells its skips to (torch._inductor.cudagraph_utils)
INDUCTOR_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"
SKIP_PREFIX = "skipping cudagraphs due to "


def check(enabled: bool, compile: str | None) -> None:
    if enabled not in (True, False, None):
        raise ValueError(f"model.cuda_graphs={enabled!r}: give true or false")
    if enabled and compile is None:
        raise ValueError(
            "model.cuda_graphs=true needs model.compile (unet, blocks or repeated): the graphs are "
            "recorded by Inductor from the compiled U-Net"
        )


def unusable(device: torch.device | None, accumulate: int = 1, fsdp: bool = False) -> str | None:
    """Why graphs cannot be used on `device` with `accumulate` micro-batches a step, sharded or
    not (None when they can)."""
    if fsdp:  # each sharded block gathers its weights in hooks between the compiled regions
        return "trainer=fsdp: the shards' gathers run between the U-Net's layers, outside any graph"
    if device is None or device.type != "cuda":
        where = "no device" if device is None else f"device {device}"
        return f"{where}: CUDA graphs need a CUDA device"
    if accumulate > 1:  # a replay would overwrite the gradients the next micro-batch adds to
        return (
            f"trainer.accumulate_grad_batches={accumulate}: gradients summed over micro-batches "
            "would live in memory the next replay reuses"
        )
    return None


def inductor() -> Callable:
    """Inductor with CUDA graphs on, as a backend another backend can wrap (the layout pass:
    `torch.compile` takes a backend or a mode, not both)."""

    def inductor_with_cudagraphs(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})

    return inductor_with_cudagraphs


class SkipReasons(logging.Handler):
    """Tells once per reason, in sdtrain's log, each region Inductor runs without graphs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith(SKIP_PREFIX):
            return
        reason = message[len(SKIP_PREFIX) :].splitlines()[0].strip()
        if reason not in self.reasons:
            self.reasons.append(reason)
            log.warning(
                "model.cuda_graphs: a compiled U-Net region runs with ordinary launches: %s", reason
            )


_handler: SkipReasons | None = None


def watch_skips() -> SkipReasons:
    """Hook `SkipReasons` onto Inductor's logger (once per process); returns it."""
    global _handler
    if _handler is None:
        _handler = SkipReasons()
        logging.getLogger(INDUCTOR_LOGGER).addHandler(_handler)
    return _handler


class Steps:
    """Per training batch: tell the graph trees a new step begins (its outputs from the last
    replay may be overwritten), and say once if the batch shape changes."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def begin(self, shape: tuple[int, ...] | None) -> None:
        torch.compiler.cudagraph_mark_step_begin()
        if shape is None or shape in self.shapes:
            return
        self.shapes.append(shape)
        if len(self.shapes) == 2:
            log.warning(
                "model.cuda_graphs: the batch shape changed (%s, then %s): graphs are recorded "
                "per shape, each with its own memory; batches of one resolution record once",
                self.shapes[0],
                self.shapes[1],
            )
