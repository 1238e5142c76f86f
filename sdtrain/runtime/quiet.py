"""Quiet by default: silence the messages of other libraries that a user cannot act on.

Every message silenced here is named with its source and why no user action helps; `verbose=true`
(`sdtrain-train verbose=true`) shows them all again. Warnings a user can act on stay, among them
sdtrain's own (bad data skipped, non-finite steps, a changed data order), Lightning's hint to use
an idle GPU, and every W&B warning.

Messages are matched by precise regexes on the logger that emits them (a `logging.Filter`, so
they leave the console and `train.log` alike) or by `warnings.filterwarnings` with the message
and category; nothing is turned off by level or by a whole library.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import warnings

# (logger, message regex): info lines of other libraries that a user cannot act on.
LOG_NOISE: tuple[tuple[str, str], ...] = (
    # Lightning's device banner: the run's own config says what it uses; an idle GPU gets its own
    # warning ("GPU available but not used"), which stays.
    ("lightning.pytorch.utilities.rank_zero", r"(GPU|TPU|HPU) available: "),
    # Lightning's advertisements for its cloud products (litlogger, litmodels).
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: "),
    # The run's summary (callbacks/progress_log.py) says how many steps it trained.
    ("lightning.pytorch.utilities.rank_zero", r"`Trainer\.fit` stopped: `max_steps=\d+` reached"),
    # The seed is the config's `seed`, recorded in .hydra/config.yaml.
    ("lightning.fabric.utilities.seed", r"Seed set to "),
    # transformers 5 falls back to PIL image processors without torchvision; SD training uses no
    # image processor (importing diffusers' pipelines touches CLIP's and SigLIP's).
    ("transformers.utils.import_utils", r"`\w+ImageProcessor` requires torchvision"),
    # ThroughputMonitor on CPU: there is no peak FLOP/s to compare with, so no MFU (on an unknown
    # GPU the same line says to set callbacks.throughput.peak_flops, and stays).
    ("sdtrain.callbacks.throughput", r"no peak FLOP/s known for device cpu"),
    # boto3 (s3:// shards) says where it found credentials and the endpoint, once per process: a
    # run that cannot read its shards says why (datamodules/remote.py).
    ("botocore.credentials", r"Found credentials in "),
    ("botocore.configprovider", r"Found endpoint for "),
    # bitsandbytes (model.optimizer: its 8-bit AdamW) tries to fetch a CPU 4-bit matmul kernel from
    # the Hub at import; sdtrain uses only its optimizers, which need no such kernel.
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward"),
    # torchao (model.fp8; diffusers and transformers import it when it is installed) tries its
    # compiled kernels for MX formats and CUTLASS at import, which a CPU build of torch or another
    # CUDA lacks; its float8 training, all sdtrain uses, is PyTorch code and needs none of them.
    ("torchao", r"Failed to load .*\.so"),
    # torchao registers its enums with torch's pytree, which torch 2.13 now supports natively.
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported"),
    # diffusers' torchao quantizer registers torchao's quantized tensor types for loading
    # torchao-quantized checkpoints, and warns when a torchao release has moved them; sdtrain
    # loads no quantized checkpoint.
    ("diffusers.quantizers.torchao.torchao_quantizer", r"Unable to import `torchao` Tensor"),
)

# (message regex, category): Python warnings a user cannot act on.
WARNING_NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning 2.6 uses torch's deprecated LeafSpec inside its own code.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # The frozen VAE and text encoder stay in eval mode on purpose (StableDiffusionModule.train).
    (r".*module\(s\) in eval mode at the start of training", UserWarning),
)
# Resuming in the run's own folder: its checkpoints/ is expected to hold the earlier ones. (A new
# run pointed at a used folder keeps the warning.)
RESUME_NOISE: tuple[tuple[str, type[Warning]], ...] = (
    (r"Checkpoint directory .* exists and is not empty", UserWarning),
)


class _Drop(logging.Filter):
    """Drops the records whose message matches `pattern`."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_installed: list[tuple[logging.Logger, logging.Filter]] = []
_warning_filters: list[tuple] = []
_env_set: list[str] = []
_bars_off: list[str] = []  # the modules whose bars apply() turned off


def apply(verbose: bool = False, resuming: bool = False) -> None:
    """Silence the noise (`verbose` False) or show everything (`verbose` True); idempotent.

    Args:
        verbose: show every message of every library, as they come.
        resuming: the run resumes from a checkpoint (its checkpoint folder is not empty).
    """
    restore()
    if verbose:
        return
    for name, pattern in LOG_NOISE:
        logger, flt = logging.getLogger(name), _Drop(pattern)
        logger.addFilter(flt)
        _installed.append((logger, flt))
    for pattern, category in WARNING_NOISE + (RESUME_NOISE if resuming else ()):
        warnings.filterwarnings("ignore", message=pattern, category=category)
        _warning_filters.append(warnings.filters[0])
    # W&B's run header and footer (version, "saved locally in", the history table): the run's
    # summary names the W&B run folder and the `wandb sync` command. W&B warnings still show.
    # (An offline run's three header lines print whatever WANDB_QUIET says: `loggers.wandb`
    # makes such a run silent while `active()`.)
    if "WANDB_QUIET" not in os.environ:
        os.environ["WANDB_QUIET"] = "true"
        _env_set.append("WANDB_QUIET")
    # Progress bars for loading and saving a few files of weights (`Loading weights`).
    _hf_progress_bars(False)


def active() -> bool:
    """Whether `apply` silences the noise now (not verbose)."""
    return bool(_installed)


def restore() -> None:
    """Undo `apply`: every message shows again."""
    for logger, flt in _installed:
        logger.removeFilter(flt)
    _installed.clear()
    for entry in _warning_filters:
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    _warning_filters.clear()
    mutated = getattr(warnings, "_filters_mutated", None)  # as filterwarnings does: clears the
    if mutated is not None:  # per-module caches of what was ignored
        mutated()
    for name in _env_set:
        os.environ.pop(name, None)
    _env_set.clear()
    if _bars_off:
        _hf_progress_bars(True)
        _bars_off.clear()


def _hf_progress_bars(enabled: bool) -> None:
    """transformers' (and huggingface_hub's) and diffusers' progress bars off (those that were
    on: `Loading weights`, `Loading pipeline components...`), or back on (those turned off)."""
    if enabled:
        for name in _bars_off:
            importlib.import_module(name).enable_progress_bar()
        return
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            library = importlib.import_module(name)
        except ImportError:
            continue
        if library.is_progress_bar_enabled():
            library.disable_progress_bar()
            _bars_off.append(name)
