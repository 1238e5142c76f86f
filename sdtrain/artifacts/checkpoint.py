"""The checkpoint schema: every key an sdtrain checkpoint holds, and the one place that reads them.

A checkpoint is Lightning's dictionary plus one entry of ours, `checkpoint["sdtrain"]`:

| key | what |
| --- | --- |
| `state_dict` (Lightning) | the trainable weights only: the U-Net's (`unet.`-prefixed; with LoRA only its adapters; none when it is frozen), the text encoder's when it trains (`text_encoder.`; textual inversion: the new tokens' rows alone); frozen parts are left out and reload from `run.pretrained` |
| `optimizer_states`, `lr_schedulers`, `loops`, `global_step`, `epoch`, `callbacks` (Lightning) | the training position; `callbacks` holds the sampling callback's bookkeeping and `DataPosition`: the data position per rank and worker (`sdtrain.datamodules.position`) |
| `lr_schedulers[0]["num_training_steps"]` | the LR schedule's horizon (`model.lr_scheduler.num_training_steps` as the scheduler was built): a resume keeps it (`lr_horizon`); absent before it, or when the scheduler has none |
| `sdtrain.version` | `VERSION`, the schema of this layout |
| `sdtrain.run` | `pretrained` (the model folder), `unet_config` (the U-Net's diffusers config), `prediction_type`, `wandb_run_id` (or None), `lora` (`model.lora`'s settings, None without LoRA; absent before it), `single_file_config` (the configs folder of a single-file `pretrained`; None for a folder; absent before it), `zero_terminal_snr` (whether the noise schedule was rescaled to zero terminal SNR; export and sampling rebuild it; absent before it), `textual_inversion` (`model.textual_inversion`'s settings: export adds the tokens again to load their rows into; None without; absent before it) |
| `sdtrain.training.ema` | `EMA.state_dict()`: fp32 `shadow` by parameter name, `num_updates`, `last_step`, `decay`; None without EMA |
| `sdtrain.skipped_total` | unusable data samples skipped so far, summed over ranks |
| `sdtrain.skipped_by_kind` | the same by kind (`sdtrain.datamodules.batch.SKIP_KINDS`), non-zero kinds only (absent: none) |
| `sdtrain.skipped_nonfinite` | optimizer steps skipped for NaN/inf gradients so far (absent: 0) |
| `sdtrain.drawn_total` | data samples drawn so far, usable or not, summed over ranks (absent: 0) |

Every value is a tensor or a plain Python type, so checkpoints load with
`torch.load(weights_only=True)`: loading one never unpickles code. Resume (the module's
`on_load_checkpoint`) and export read through `upgrade`, which turns any older layout this code
knows into the current one and refuses a newer one by name.

Versions: 1 (before the schema; no `version`, run metadata flat under `sdtrain`, the EMA under
`callbacks["EMA"]`), 2 (this layout).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

VERSION = 2
ROOT = "sdtrain"
UNET_PREFIX = "unet."  # the trainable weights' prefix in Lightning's state_dict
RUN_KEYS = (
    "pretrained",
    "unet_config",
    "prediction_type",
    "wandb_run_id",
    "lora",
    "single_file_config",
    "zero_terminal_snr",
    "textual_inversion",
)
TEXT_PREFIX = "text_encoder."  # a trained text encoder's weights, in state_dict and EMA shadow


class CheckpointError(ValueError):
    """A file that is not an sdtrain checkpoint this version can read."""


def build(
    run: dict[str, Any],
    ema: dict[str, Any] | None,
    skipped_total: int,
    skipped_nonfinite: int = 0,
    skipped_by_kind: dict[str, int] | None = None,
    drawn_total: int = 0,
) -> dict[str, Any]:
    """The `checkpoint["sdtrain"]` entry for a checkpoint being written."""
    unknown = set(run) - set(RUN_KEYS)
    if unknown:
        raise KeyError(f"run metadata has keys the schema does not name: {sorted(unknown)}")
    return {
        "version": VERSION,
        "run": {k: run.get(k) for k in RUN_KEYS},
        "ema": ema,
        "skipped_total": int(skipped_total),
        "skipped_nonfinite": int(skipped_nonfinite),
        "skipped_by_kind": {k: int(v) for k, v in (skipped_by_kind or {}).items() if v},
        "drawn_total": int(drawn_total),
    }


def trainable_only(state_dict: dict[str, torch.Tensor], keep: set[str] | None = None) -> None:
    """Drop every weight but the trainable ones (`keep`; None: the U-Net's) from Lightning's
    state_dict, in place."""
    kept = keep.__contains__ if keep is not None else lambda k: k.startswith(UNET_PREFIX)
    for key in [k for k in state_dict if not kept(k)]:
        del state_dict[key]


def version_of(ckpt: dict[str, Any], where: str = "checkpoint") -> int:
    entry = ckpt.get(ROOT)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} is not an sdtrain checkpoint (no '{ROOT}' entry)")
    version = entry.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{where}: schema version {version!r} is not an integer")
    if version > VERSION or version < 1:
        raise CheckpointError(
            f"{where} has checkpoint schema version {version}; this sdtrain reads versions "
            f"1 to {VERSION} (a newer sdtrain wrote it? upgrade sdtrain)"
        )
    return version


def upgrade(ckpt: dict[str, Any], where: str = "checkpoint") -> dict[str, Any]:
    """Bring `ckpt` to the current layout, in place; return it. Raises CheckpointError if unknown."""
    if version_of(ckpt, where) == 1:
        old = ckpt[ROOT]
        ema = ckpt.get("callbacks", {}).pop("EMA", None)  # the v1 EMA callback's state
        ckpt[ROOT] = build({k: old.get(k) for k in RUN_KEYS}, ema, int(old.get("skipped_total", 0)))
    return ckpt


SHARDED_META = "meta.pt"  # Lightning's name for a sharded checkpoint's non-tensor part
SHARDED_EMA = (
    "ema_shadow"  # the EMA's shards beside the weights' (sdtrain.training.sharding.FSDPStrategy)
)


def is_sharded(path: str | Path) -> bool:
    """A sharded checkpoint: the folder trainer=fsdp writes with save_distributed_checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / SHARDED_META).is_file()


def sharded_keys(path: Path, group: str) -> set[str]:
    """The keys saved under `group` ("state_dict", SHARDED_EMA, ...) in a sharded checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    names = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len(group) + 1 :] for k in names if k.startswith(group + ".")}


def read_meta(path: Path, weights_only: bool | None = True) -> dict[str, Any]:
    """A sharded checkpoint's meta.pt: everything but the tensors that are sharded."""
    return torch.load(path / SHARDED_META, map_location="cpu", weights_only=weights_only)


def load_sharded(path: Path) -> dict[str, Any]:
    """A sharded checkpoint as one whole checkpoint in memory (no processes needed): meta.pt
    with the weights and the EMA's shards put together; the optimizer state is left out."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = read_meta(path)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "whole.pt")
        whole = torch.load(Path(tmp) / "whole.pt", map_location="cpu", weights_only=True)
    ckpt["state_dict"] = whole["state_dict"]
    ema = (ckpt.get(ROOT) or {}).get("ema")
    if ema and ema.pop("sharded", False):
        ema["shadow"] = whole[SHARDED_EMA]
    return ckpt


def load_meta(path: str | Path) -> dict[str, Any]:
    """What a resume checks first (step, run record): a sharded checkpoint's meta.pt alone (its
    tensors stay on disk: every rank reads this), or the whole file otherwise (memory-mapped)."""
    path = Path(path)
    if not is_sharded(path):
        return load(path)
    return upgrade(read_meta(path), str(path))


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (`weights_only=True`, on the CPU), or a sharded checkpoint folder,
    and upgrade it to this layout."""
    path = Path(path)
    if is_sharded(path):
        return upgrade(load_sharded(path), str(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} is not a file"
            + (
                " (a folder, but no sharded checkpoint: no .metadata and meta.pt)"
                if path.is_dir()
                else ""
            )
        )
    if not zipfile.is_zipfile(
        path
    ):  # torch.save writes a zip archive; torch's own error is cryptic
        raise CheckpointError(
            f"{path} is not a loadable checkpoint: not the zip archive torch.save writes "
            "(truncated, damaged or another kind of file)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} does not load as a checkpoint with weights_only=True ({first})"
        ) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not an sdtrain checkpoint (holds {type(ckpt).__name__})")
    return upgrade(ckpt, str(path))


def run_info(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The run metadata of an upgraded checkpoint (`RUN_KEYS`)."""
    return dict(ckpt[ROOT]["run"])


LR_HORIZON = "num_training_steps"  # the key of the horizon in the LR scheduler's saved state


def lr_horizon(ckpt: dict[str, Any]) -> int | None:
    """The horizon (total steps) the checkpoint's LR schedule was built with; None when it holds
    none (written before sdtrain recorded it, weights only, or a scheduler without a horizon)."""
    schedulers = ckpt.get("lr_schedulers") or [None]
    value = schedulers[0].get(LR_HORIZON) if isinstance(schedulers[0], dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def ema_state(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    return ckpt[ROOT]["ema"]


def skipped_total(ckpt: dict[str, Any]) -> int:
    return int(ckpt[ROOT]["skipped_total"])


def unet_weights(ckpt: dict[str, Any], ema: bool, where: str = "checkpoint") -> dict[str, Any]:
    """The U-Net's weights from an upgraded checkpoint: the EMA shadow, or the trained weights."""
    if ema:
        state = ema_state(ckpt)
        if not state or state.get("shadow") is None:
            raise KeyError(
                f"{where} holds no EMA weights (trained with model.ema=null?); "
                "pass --no-ema to export the raw U-Net"
            )
        return {k: v for k, v in state["shadow"].items() if not k.startswith(TEXT_PREFIX)}
    sd = ckpt["state_dict"]
    return {k[len(UNET_PREFIX) :]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}


def text_encoder_weights(ckpt: dict[str, Any], ema: bool) -> dict[str, Any]:
    """The trained text encoder's weights (full or LoRA; EMA or raw), unprefixed; {} if frozen."""
    state = ema_state(ckpt) if ema else None
    source = state["shadow"] if state and state.get("shadow") is not None else ckpt["state_dict"]
    n = len(TEXT_PREFIX)
    return {k[n:]: v for k, v in source.items() if k.startswith(TEXT_PREFIX)}


def plain(value: Any) -> Any:
    """`value` as plain JSON types (dicts, lists, str, numbers, None), for weights_only loading."""
    return json.loads(json.dumps(value, default=str))
