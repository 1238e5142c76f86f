"""Atomic checkpoint files: a run killed mid-save leaves the previous file whole, never half a new one.

Lightning's TorchCheckpointIO buffers the whole checkpoint in memory, writes it to a temporary file
in the system temp folder and moves it over the target. Where that folder is another filesystem
(node-local /tmp, checkpoints on NFS or Lustre) the move is a copy *into the target itself*, so a
kill mid-copy leaves a truncated `last.ckpt` that `ckpt_path=last` then picks; a kill at any point
leaves a checkpoint-sized orphan in /tmp that nothing removes; and nothing is fsynced, so a power
loss can leave an empty file under the final name.

`atomic_write` instead writes `.<name>.tmp-<pid>` beside the target, flushes and fsyncs it, renames
it onto the name (`os.replace`: atomic within one folder) and fsyncs the folder so the rename
itself survives a crash. A reader sees the old file or the new one, never a mix. The temporary name
starts with a dot and does not end in `.ckpt`, so neither `ckpt_path=last` nor Lightning's own
checkpoint discovery takes it; `remove_partial` deletes the ones a killed run left (the checkpoint
callback calls it when a run starts).

`AtomicCheckpointIO` is the Lightning plugin (`trainer.plugins` in conf/trainer/default.yaml):
every checkpoint the trainer saves goes through it (`step_*.ckpt`, `last.ckpt`, the saves on an
exception or a signal). Remote paths (`s3://...`) keep Lightning's fsspec transaction.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

PARTIAL_MARK = ".tmp-"  # `.<name>.tmp-<pid>`: obviously partial, never `*.ckpt`
ASIDE_MARK = ".old-"  # `.<name>.old-<pid>`: a sharded checkpoint being replaced (`replace_folder`)


def partial_name(path: Path) -> Path:
    """Where `atomic_write` puts the bytes for `path` until they are complete."""
    return path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Run `write(file)` into a temporary file beside `path`, then put it in `path`'s place.

    If `write` raises (or the process dies) `path` keeps its old content; the temporary file is
    removed on an exception and left for `remove_partial` on a kill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def replace_folder(tmp: Path, path: Path) -> None:
    """Put the complete checkpoint folder `tmp` (a sharded save) in `path`'s place.

    POSIX cannot swap a non-empty folder in one rename, so the old checkpoint is renamed aside
    first (`.<name>.old-<pid>`), the new one renamed onto the name, and the old one deleted. A
    kill between the two renames leaves no `path` but the old checkpoint whole beside it:
    `put_back` restores it (when `ckpt_path` is read, and from `remove_partial`).
    """
    aside = path.with_name(f".{path.name}{ASIDE_MARK}{os.getpid()}")
    if path.exists() or path.is_symlink():
        os.replace(path, aside)
    os.replace(tmp, path)
    fsync_folder(path.parent)
    _delete(aside)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def put_back(path: Path) -> bool:
    """If `path` is missing because a save was killed between `replace_folder`'s two renames,
    rename the checkpoint it set aside back onto `path`; True when it did. Safe when several
    ranks try at once: one rename wins, the others find the name taken."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return False
    for aside in sorted(path.parent.glob(f".{path.name}{ASIDE_MARK}*")):
        try:
            os.replace(aside, path)
        except OSError:  # another rank put it back first
            return path.exists()
        log.warning("put back %s: a killed save had set it aside", path)
        return True
    return False


def remove_partial(folder: str | Path) -> list[Path]:
    """Delete what saves that never finished left in `folder` (temporary files, and the folders
    of sharded saves); return them. A checkpoint a killed `replace_folder` had set aside goes
    back to its name when nothing took that name.

    Call it before the run saves anything: it does not tell another live writer's files apart.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    for aside in sorted(folder.glob(f".*{ASIDE_MARK}*")):
        name = folder / aside.name[1:].rsplit(ASIDE_MARK, 1)[0]
        if not put_back(name):
            _delete(aside)
    stale = list(folder.glob(f".*{PARTIAL_MARK}*"))
    for p in stale:
        _delete(p)
    if stale:
        log.warning(
            "removed %d unfinished checkpoint file(s) of an earlier run: %s",
            len(stale),
            ", ".join(p.name for p in stale),
        )
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves go through `atomic_write` (streamed, not buffered)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f))
