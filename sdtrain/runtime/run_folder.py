"""The run folder: `latest` finds the newest run, and a run that never started leaves no folder.

A Hydra callback (`hydra.callbacks.run_folder` in conf/train.yaml). Hydra makes the run folder
(`hydra.run.dir`, by default `outputs/train/runs/<date>_<time>/`) and writes its record there
(`.hydra/`, the job log `train.log`) before `sdtrain-train` sees the config, so a config mistake
used to leave a dated folder holding nothing else.

- `latest`: a symlink beside the dated run folders (`outputs/train/runs/latest`) pointing at the
  run started last, made when its folder is made (rank 0 only).
- `discard_unused()`: called when `sdtrain-train` exits with an error. A folder this process made
  that holds nothing but Hydra's record is removed, and `latest` points back where it pointed. A
  folder that existed before (a resume's, or one named with `hydra.run.dir`) is never removed,
  nor one where the run wrote anything of its own (a W&B run, a checkpoint, samples).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class _Started:
    """The run folder this process's Hydra run uses, and what was there before it."""

    folder: Path
    existed: bool
    record: str | None  # Hydra's record folder inside it (`hydra.output_subdir`)
    made: Path | None = None  # the highest folder this run made (the run folder or a parent)
    latest: Path | None = None  # the link made for this run
    previous: str | None = None  # where `latest` pointed before (None: it did not exist)
    at: float = field(default_factory=time.monotonic)  # when Hydra started the run


_started: _Started | None = None


def seconds_since_start() -> float | None:
    """Seconds since Hydra started this process's run (None outside a Hydra run)."""
    return None if _started is None else time.monotonic() - _started.at


def first_rank() -> bool:
    """Rank 0 of a torchrun or SLURM launch, or a single process (Lightning's own children are
    started with LOCAL_RANK set)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return rank == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


class RunFolder(Callback):
    """Keeps `latest` beside the run folders and notes whether the run folder is new.

    Args:
        latest: the link to the newest run folder; made only for run folders beside it (a
            `hydra.run.dir` elsewhere gets none). None: no link.
    """

    def __init__(self, latest: str | None = None) -> None:
        self.latest = Path(latest) if latest else None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _started
        folder = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        record = OmegaConf.select(config, "hydra.output_subdir")
        _started = _Started(folder, folder.exists(), None if record is None else str(record))
        _started.made = first_missing(folder)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _started is None or self.latest is None or not first_rank():
            return
        latest = self.latest.absolute()
        if latest.parent != _started.folder.parent or latest == _started.folder:
            return
        previous = os.readlink(latest) if latest.is_symlink() else None
        if link(latest, _started.folder.name):
            _started.latest, _started.previous = latest, previous


def first_missing(folder: Path) -> Path | None:
    """The highest of `folder` and its parents that does not exist yet (None: it exists)."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def link(path: Path, target: str) -> bool:
    """Point the symlink `path` at `target` (relative to its folder), replacing it atomically;
    False where that cannot be done (a file or folder of that name, no symlinks on this system)."""
    if path.exists() and not path.is_symlink():
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("could not link %s -> %s: %s", path, target, e)
        tmp.unlink(missing_ok=True)
        return False
    return True


def discard_unused() -> bool:
    """Remove the run folder this process made if it holds only Hydra's record and the job log
    (the run failed before writing anything of its own), and point `latest` back. Returns
    whether the folder was removed. Never raises."""
    started = _started
    if started is None or started.existed or not first_rank() or not started.folder.is_dir():
        return False
    try:
        logs = _job_logs(started.folder)
        own = {p.name for p in started.folder.iterdir()} - set(logs) - {_top(started.record)}
        if own:
            return False
        for handler in logs.values():  # the job log is written no more
            logging.getLogger().removeHandler(handler)
            handler.close()
        shutil.rmtree(started.folder)
        remove_empty_parents(started)
        if started.latest is not None:
            if started.previous is None:
                started.latest.unlink(missing_ok=True)
            else:
                link(started.latest, started.previous)
    except OSError as e:
        log.debug("could not remove the unused run folder %s: %s", started.folder, e)
        return False
    return True


def remove_empty_parents(started: _Started) -> None:
    """Remove the parents of the run folder that this run made (`outputs/train/runs/` of a
    first run), as long as they are empty; `latest` points back first, so an earlier run's
    link keeps its folder."""
    if started.made is None or started.made == started.folder:
        return
    if started.latest is not None and started.previous is None:
        started.latest.unlink(missing_ok=True)
    for parent in started.folder.parents:
        try:
            parent.rmdir()  # only an empty folder
        except OSError:
            return
        if parent == started.made:
            return


def _top(record: str | None) -> str | None:
    """The first part of Hydra's record folder (`.hydra` of `.hydra/resume-1`)."""
    return Path(record).parts[0] if record else None


def _job_logs(folder: Path) -> dict[str, logging.FileHandler]:
    """The root logger's file handlers writing into `folder` (Hydra's `train.log`), by name."""
    found = {}
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            path = Path(handler.baseFilename)
            if path.parent == folder.resolve() or path.parent == folder:
                found[path.name] = handler
    return found
