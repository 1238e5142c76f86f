"""Drop diffusers' layout copies from a compiled channels-last U-Net (`model.drop_layout_copies`).

diffusers calls `.contiguous()` in a few places of a training U-Net: before each ResNet block's
shortcut convolution (in training mode), on each Transformer2D block's output before its `proj_out`
convolution, and before the nearest upsampling at 64 or more images a batch. On a channels-last
(NHWC) U-Net each call turns the activation row-major (NCHW), and the convolution after it, whose
weights are channels-last, turns it back: two full copies of a large activation in the forward and
two more for its gradient in the backward, none of which change a value. A convolution gives the
same numbers whatever its input's layout (cuDNN converts the input to the weights' layout itself),
and so does a nearest upsampling, whose output keeps its input's layout.

`drop_layout_copies` removes such a `.contiguous()` from the graph torch.compile (Dynamo) captures,
when every use of its result is a convolution, or a nearest upsampling whose every use is a
convolution. Nothing else changes: AOTAutograd then traces the backward from the edited graph,
so the gradients' copies go too. `backend()` is the torch.compile backend that does it before
handing the graph to Inductor (or to another backend, for tests on a CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

log = logging.getLogger(__name__)

# calls whose values do not depend on their tensor arguments' memory layout
_CONVOLUTIONS = {torch.conv2d, F.conv2d, torch.convolution, torch.ops.aten.convolution.default}
_UPSAMPLES = {F.interpolate, torch._C._nn.upsample_nearest2d}


def _is_plain_contiguous(node: fx.Node) -> bool:
    if node.op != "call_method" or node.target != "contiguous":
        return False
    fmt = node.kwargs.get("memory_format", node.args[1] if len(node.args) > 1 else None)
    return fmt in (None, torch.contiguous_format)


def _nearest(node: fx.Node) -> bool:
    mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
    return node.target is torch._C._nn.upsample_nearest2d or mode == "nearest"


def _convolution(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":  # a graph that kept its modules (Dynamo inlines them)
        return isinstance(gm.get_submodule(node.target), torch.nn.Conv2d)
    return node.op == "call_function" and node.target in _CONVOLUTIONS


def _layout_free(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Every use of `node`'s value gives the same numbers whatever that value's layout."""
    for user in node.users:
        if _convolution(gm, user):
            continue
        upsample = user.op == "call_function" and user.target in _UPSAMPLES and _nearest(user)
        if upsample and user.users and all(_convolution(gm, u) for u in user.users):
            continue
        return False
    return bool(node.users)


def drop_layout_copies(gm: fx.GraphModule) -> int:
    """Remove each `.contiguous()` whose result only feeds layout-free calls; returns how many.
    Subgraphs (a checkpointed region's body, which Dynamo keeps as a GraphModule attribute of
    the graph) are edited too."""
    dropped = sum(drop_layout_copies(m) for m in gm.children() if isinstance(m, fx.GraphModule))
    for node in list(gm.graph.nodes):
        if _is_plain_contiguous(node) and _layout_free(gm, node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        gm.graph.lint()
        gm.recompile()
    return dropped


def backend(inner: str | Callable = "inductor") -> Callable:
    """A torch.compile backend: `drop_layout_copies`, then `inner` (Inductor by default)."""

    def compile_without_layout_copies(gm: fx.GraphModule, example_inputs):
        dropped = drop_layout_copies(gm)
        log.info("torch.compile: %d layout copies dropped from a graph", dropped)
        compiler = torch._dynamo.lookup_backend(inner) if isinstance(inner, str) else inner
        return compiler(gm, example_inputs)

    return compile_without_layout_copies
