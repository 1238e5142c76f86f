"""Fast settings for the U-Net step, each a switch in `model.speed` (measured in docs/benchmarks.md).

- `compile`: None (eager), "unet" (the whole U-Net's forward), "blocks" (each down/mid/up block
  on its own: regional compile, shorter warm-up, the same kernels where the time goes) or
  "repeated" (each transformer and ResNet layer, compiled once per shape and shared by all its
  copies: SDXL's whole-U-Net compile ran past 4 minutes on an H100 before its first step). Compiled in
  place with `nn.Module.compile`, so parameter names, checkpoints and the EMA are unchanged.
- `channels_last`: NHWC memory format for the U-Net's convolutions (cuDNN's fast layout on GPUs).
- `drop_layout_copies`: with `compile` and `channels_last`, compile through `sdtrain.models.layout.backend`,
  which removes diffusers' `.contiguous()` calls in front of convolutions (NHWC -> NCHW -> NHWC
  copies of large activations that change no value) before Inductor sees the graph.
- `attention`: which fused kernel serves `scaled_dot_product_attention` (the U-Net's attention):
  None leaves PyTorch's own choice; "flash", "efficient" or "cudnn" allows only that one (the math
  kernel stays as the fallback for shapes it cannot take). Set per process, before compiling.
- `fuse_projections`: one matmul for each attention's q, k and v (k and v for cross-attention),
  with diffusers' own parameters (`sdtrain.models.attention`).
- `cuda_graphs`: with `compile`, the compiled regions' forward and backward recorded as CUDA
  graphs and replayed (`sdtrain.models.cuda_graphs`): a step's kernel launches cost no CPU time.
- `attention_pad_heads`: zero-pad the attention heads to a multiple of this width (64) for the
  kernel call, the same values (`sdtrain.models.attention`): SD-1.x's heads are 40 wide.
- `float32_matmul_precision`: "high" lets fp32 matmuls use TF32 on Ampere and later ("highest"
  keeps full fp32). Set once per process, before the first matmul.
- `cuda_alloc_conf`: the CUDA caching allocator's settings, `PYTORCH_CUDA_ALLOC_CONF` unless the
  user set that (or `PYTORCH_ALLOC_CONF`) already. The default, `expandable_segments:True`, grows
  one mapped segment instead of caching blocks of fixed sizes: less fragmentation near the card's
  limit (SDXL at batch 4 on an H100: 11.6 -> 12.6 images/s, docs/benchmarks.md). Set before CUDA
  starts; DDP's children inherit it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

COMPILE_MODES = (None, "unet", "blocks", "repeated")
# "repeated": the layers a U-Net repeats, each compiled once per shape and reused by every copy
# (diffusers' `compile_repeated_blocks` names the transformer block; the ResNet block repeats too)
REPEATED = ("BasicTransformerBlock", "ResnetBlock2D")
ATTENTION = (None, "flash", "efficient", "cudnn")


def check(
    compile: str | None,
    attention: str | None = None,
    pad_heads: int | None = None,
    cuda_graphs: bool = False,
) -> None:
    from sdtrain.models import cuda_graphs as graphs

    graphs.check(cuda_graphs, compile)
    if pad_heads is not None:
        from sdtrain.models.attention import check_pad

        check_pad(pad_heads)
    if compile not in COMPILE_MODES:
        raise ValueError(f"model.compile={compile!r} is not one of {list(COMPILE_MODES)}")
    if attention not in ATTENTION:
        raise ValueError(f"model.attention={attention!r} is not one of {list(ATTENTION)}")


def set_attention(name: str | None) -> None:
    """Allow only the `name` fused SDPA kernel (plus the math fallback); None changes nothing."""
    check(None, name)
    if name is None:
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_math_sdp(True)
    log.info("attention: %s kernel (math as the fallback)", name)


def compile_unet(
    unet: nn.Module,
    mode: str | None,
    drop_layout_copies: bool = False,
    cuda_graphs: bool = False,
    **options,
) -> None:
    """Compile the U-Net in place: whole ("unet") or block by block ("blocks"); with
    `drop_layout_copies` (for a channels-last U-Net) through `sdtrain.models.layout.backend`;
    with `cuda_graphs`, Inductor records CUDA graphs (`sdtrain.models.cuda_graphs`)."""
    check(mode)
    if mode is None:
        return
    if cuda_graphs:
        from sdtrain.models import cuda_graphs as graphs

        graphs.watch_skips()
        if drop_layout_copies:  # a backend of its own: Inductor with graphs inside it
            options.setdefault("inner_backend", graphs.inductor())
        else:
            options.setdefault("mode", "reduce-overhead")
    if drop_layout_copies:
        from sdtrain.models import layout

        options.setdefault("backend", layout.backend(options.pop("inner_backend", "inductor")))
    if mode == "unet":
        unet.compile(**options)
        return
    if mode == "repeated":
        layers = [m for m in unet.modules() if type(m).__name__ in REPEATED]
        checkpoint_inside(unet, layers)
        # one compiled graph per distinct (layer kind, shape): SDXL has ~20, past dynamo's
        # default of 8 recompiles per code object, beyond which the rest would run eagerly
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else None
        limit = limit or "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
        for m in layers:
            m.compile(**options)
        log.info("compiled %d repeated U-Net layers (regional compile)", len(layers))
        return
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    for block in blocks:
        if block is not None:
            block.compile(**options)
    log.info("compiled %d U-Net blocks (regional compile)", len(blocks))


def _call(module: nn.Module, *args):
    return module(*args)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The layer's own forward under a checkpoint when gradients are on (directly otherwise), as a
    frame Dynamo traces: a partial of `checkpoint` would start in torch's skipped files and compile
    nothing. `self` stays a frame input, so layers of one kind and shape share a graph as before;
    the forward is the plain function kept on the layer (`type(self).forward` breaks the graph:
    diffusers marks BasicTransformerBlock allow-in-graph)."""
    from torch.utils.checkpoint import checkpoint

    forward = self._sdtrain_layer_forward
    if not torch.is_grad_enabled():  # sampling, validation: nothing to recompute
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_inside(unet: nn.Module, layers: list[nn.Module]) -> bool:
    """With diffusers' gradient checkpointing on, move each checkpoint inside its compiled layer.

    diffusers checkpoints exactly the layers `repeated` compiles (each ResnetBlock2D and
    BasicTransformerBlock call, from their eager parents). A checkpoint around a compiled layer
    reruns the layer's compiled forward in the backward and feeds its recomputed tensors to the
    compiled backward, which asserts the strides it traced; on CUDA a channels-last convolution's
    real strides can differ from the traced ones (PyTorch issue 171622), and the SDXL pipeline
    failed so on an H100 (docs/benchmarks.md). Inside the compiled layer the checkpoint is one
    graph: AOTAutograd saves the layer's inputs and recomputes the rest in its own backward, as
    PyTorch recommends for compile with activation checkpointing. The parents then call each
    layer directly; which tensors are kept, and the values, are unchanged. Returns whether it
    applied."""
    import types

    if not getattr(unet, "is_gradient_checkpointing", False) or not layers:
        return False
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=_call)  # parents: direct calls
    for m in layers:
        m._sdtrain_layer_forward = type(m).forward  # the plain function, not bound
        m.forward = types.MethodType(_checkpointed_forward, m)
    log.info("gradient checkpointing inside %d compiled layers", len(layers))
    return True


def profile_compiled_whole(trainer, compile: str | None) -> None:
    """Lightning's PyTorchProfiler puts a `record_function` hook on every module by default, and
    each hook breaks torch.compile's graph: a profiled compiled U-Net would run module by module,
    mostly eager, and its trace would show a step that never happens unprofiled. With a compiled
    U-Net the module names are turned off (the kernels and operators are still recorded)."""
    from lightning.pytorch.profilers import PyTorchProfiler

    profiler = getattr(trainer, "profiler", None)
    if compile is None or not isinstance(profiler, PyTorchProfiler):
        return
    if getattr(profiler, "_record_module_names", False):
        profiler._record_module_names = False
        log.warning(
            "model.compile=%s with PyTorchProfiler: record_module_names turned off (its per-module "
            "hooks break the compiled graph at every module); pass record_module_names:false",
            compile,
        )


def to_channels_last(unet: nn.Module) -> None:
    unet.to(memory_format=torch.channels_last)


def apply(
    unet: nn.Module, h, fsdp: bool, device: torch.device | None = None, accumulate: int = 1
) -> bool:
    """The module's fast settings (`h`: its hparams), in place, in the order they need; returns
    whether CUDA graphs are in use (`model.cuda_graphs`, on a CUDA `device`, `accumulate`
    micro-batches a step)."""
    if h.channels_last and fsdp:  # FSDP2 shards need contiguous parameters
        log.warning("model.channels_last=true is ignored under trainer=fsdp")
    elif h.channels_last:
        to_channels_last(unet)
    set_attention(h.attention)
    pad_heads = h.get("attention_pad_heads")
    if h.fuse_projections or pad_heads:
        from sdtrain.models import attention

        attention.fuse_projections(unet, h.fuse_projections, pad_heads)
    if h.get("fp8"):  # before compile, so the compiled graph holds the FP8 casts
        from sdtrain.models import fp8

        fp8.convert(unet, h.fp8)
    nhwc = h.channels_last and not fsdp
    graphs = bool(h.get("cuda_graphs")) and h.compile is not None
    if graphs:
        from sdtrain.models.cuda_graphs import unusable

        reason = unusable(device, accumulate, fsdp)
        if reason:
            log.warning("model.cuda_graphs: ordinary launches (%s)", reason)
            graphs = False
    compile_unet(unet, h.compile, h.drop_layout_copies and nhwc, graphs)
    return graphs


def use_compile_cache(folder: str | None, compile: str | None) -> str | None:
    """Point Inductor's and Triton's caches at `folder` (paths.compile_cache) for a compiled run,
    unless TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR are set already; returns the Inductor
    folder in use. Set in the launching process, so DDP's children inherit it. A later run of the
    same shapes (a resume, a sweep trial) reads the compiled kernels back: measured on a 2-core CPU,
    the tiny model's first step went from ~2 min to seconds (tests/test_compile_resume.py)."""
    if compile is None or not folder:
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    root = Path(folder).expanduser()
    # importing diffusers/lightning already made Inductor write its default folder into the
    # variable: only a value other than that default is the user's own
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, _default_inductor_cache()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    log.info("compile cache: %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _default_inductor_cache() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: treat any value as the user's
        return None
    return os.path.abspath(default_cache_dir())


ALLOC_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def environment_alloc_conf() -> str | None:
    """The allocator setting the environment gives (either variable), if any."""
    return next((os.environ[k] for k in ALLOC_VARIABLES if os.environ.get(k)), None)


def use_cuda_alloc_conf(value: str | None) -> str | None:
    """Set `PYTORCH_CUDA_ALLOC_CONF` to `value` (the `cuda_alloc_conf` key) unless the user's
    environment sets the allocator already; returns the setting in force (None: PyTorch's own)."""
    users = environment_alloc_conf()
    if users is not None or not value:
        return users
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(
            f"cuda_alloc_conf={value!r}: give PyTorch's allocator settings as 'key:value[,key:value]'"
            " (e.g. expandable_segments:True), or null to leave PyTorch's default"
        )
    if torch.cuda.is_initialized():  # too late for the variable
        log.warning("cuda_alloc_conf=%s not applied: CUDA had started already", value)
        return None
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = value
    return value


def set_float32_matmul_precision(precision: str | None) -> None:
    if precision is None:
        return
    if precision not in ("highest", "high", "medium"):
        raise ValueError(
            f"float32_matmul_precision={precision!r}; use 'highest', 'high' or 'medium'"
        )
    torch.set_float32_matmul_precision(precision)
