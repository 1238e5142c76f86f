"""Exports and images never clobber: a used target is refused unless `--overwrite`, and what is
written goes to a hidden sibling first and takes the target's place whole once it is complete.

- A target folder that is missing or empty is written; one that holds an earlier output of the same
  tool (its marker: `model_index.json`, a LoRA file, `samples.json`) is replaced only with
  `--overwrite`, and then whole (nothing of the old folder stays beside the new files); a folder of
  other files (`.`, a home folder, a run folder) is refused even then, so a mistyped path never
  deletes anything and model files never mix into someone else's files.
- A target file (`--single-file`) is replaced only with `--overwrite`.
- The new output is written beside the target (`.NAME.XXXX.partial`) and renamed into place: a
  failed or interrupted export leaves the earlier model as it was, never a half-written one.
- Files get the mode any other new file gets (0644 under the usual umask 022), folders 0755:
  safetensors writes through a private temporary file, which left weights 0600, unreadable to the
  other users of a shared model folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FLAG = "--overwrite"
PARTIAL = ".partial"  # the suffix of a target being written


def check_folder(out: str | Path, overwrite: bool, markers: tuple[str, ...], kind: str) -> Path:
    """`out` if a folder of `kind` (e.g. "an export") may be written there; else FileExistsError.

    Args:
        out: the target folder.
        overwrite: replace a folder that holds an earlier output (one of `markers`).
        markers: file names, one of which a folder of earlier output holds.
        kind: what the folder holds, for the messages ("an export", "sdtrain-sample images").
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: name a new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not any((out / m).is_file() for m in markers):
        raise FileExistsError(
            f"{out} holds other files (no {markers[0]}): name a new or empty folder; "
            f"{FLAG} replaces only a folder holding {kind}"
        )
    if not overwrite:
        raise FileExistsError(
            f"{out} already holds {kind}: pass {FLAG} to replace the folder, or name a new one"
        )
    return out


def check_file(out: str | Path, overwrite: bool, suffix: str) -> Path:
    """`out` if a `suffix` file may be written there; else an OSError naming the fix."""
    out = Path(out).expanduser()
    if out.suffix != suffix:
        raise ValueError(f"{out}: name a {suffix} file")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder: name a {suffix} file")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass {FLAG} to replace it, or name a new file")
    return out


@contextmanager
def new_folder(out: str | Path) -> Iterator[Path]:
    """A fresh sibling folder of `out` to write into; on success it replaces `out` whole (made
    readable as any new folder), on failure it goes and `out` stays as it was."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=PARTIAL, dir=out.parent))
    try:
        yield tmp
        shared_modes(tmp)
        swap_in(tmp, out)
    except BaseException:  # Ctrl-C too: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def new_file(out: str | Path) -> Iterator[Path]:
    """A fresh sibling path of `out` (same suffix) to write; on success it replaces `out`."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{out.stem}.", suffix=f"{PARTIAL}{out.suffix}", dir=out.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~umask())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def swap_in(new: Path, out: Path) -> None:
    """Rename the folder `new` to `out`; an `out` already there is moved aside, then removed."""
    if not out.exists():
        os.rename(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, aside / out.name)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside / out.name, out)  # the earlier folder back where it was
        aside.rmdir()
        raise
    shutil.rmtree(aside)


def umask() -> int:
    """The process's umask (read from /proc where it can be: setting it to read it is racy)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_modes(root: str | Path) -> None:
    """Give every folder and file under `root` (and `root`) the mode a new one gets by default."""
    mask = umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)
