"""A resume trains what the run was.

`sdtrain-train hydra.run.dir=<run> ckpt_path=last` (or a .ckpt path) composes the config afresh.
Before Hydra parses the command line, `resume_args` puts the overrides the run recorded in front
of the new ones, so the new ones win key by key (Hydra applies overrides in order) and the rest is
what the run trained with; `note` lists both for the log. Each resume writes its own Hydra record
beside the first run's (`.hydra/resume-<n>/`, which records the whole command line it ran), and
the next resume reads the newest record, so a resume of a resume trains with what the last one did.

Without it, `hydra.run.dir=<run> ckpt_path=last` alone trained the run's checkpoint with the
default config (the demo's data and settings), saying only an INFO line.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from sdtrain.cli.config_checks import plain_overrides

RECORD = "overrides.yaml"  # what Hydra writes of the task's overrides, one a line
note: str | None = None  # what `resume_args` reused and changed, for the app to log


def resume_args(args: list[str]) -> list[str]:
    """The command line for Hydra: `args` with the run's recorded overrides in front and its own
    record's place, when they resume a run in its folder; else `args` as they are."""
    out = resume_record(with_recorded(args))
    if out == args:
        return args
    # Hydra's flags (and their values) first, then every override: argparse takes the overrides
    # as one run of positionals, so `... --cfg job hydra.mode=RUN` would be refused
    return [a for a in out if not is_override(a)] + [a for a in out if is_override(a)]


def resumed_run(args: list[str]) -> Path | None:
    """The run folder `args` resume (`hydra.run.dir=<run>` and a `ckpt_path`, not a sweep), when
    it holds a Hydra record; else None."""
    values = {o.key_or_group: o.value() for o in plain_overrides(args) if not o.is_delete()}
    run_dir, ckpt = values.get("hydra.run.dir"), values.get("ckpt_path")
    if not run_dir or ckpt in (None, "null") or {"-m", "--multirun"} & set(args):
        return None
    run = Path(str(run_dir))
    return run if (run / ".hydra").is_dir() else None


def started_at() -> float:
    """When this process started, by the wall clock to 1/100 s (Linux's /proc; elsewhere: now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def newest_record(run: Path) -> Path | None:
    """The run's newest record of overrides, the first run's or a resume's, written before this
    process started: under torchrun or SLURM rank 0 writes this start's own record while the other
    ranks read theirs, and every rank must read the same."""
    records = run / ".hydra"
    found = {0: records / RECORD}
    for folder in records.glob("resume-*"):
        if folder.name[7:].isdigit():
            found[int(folder.name[7:])] = folder / RECORD
    start = started_at()
    done = [n for n, f in found.items() if f.is_file() and f.stat().st_mtime < start]
    return found[max(done)] if done else None


def is_override(arg: str) -> bool:
    """Whether a command-line word is a Hydra override (not a flag such as -m, --cfg, or a flag's
    value such as job)."""
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def parsed(lines: list[str]) -> list[Any]:
    """Hydra's reading of the overrides among `lines` (its flags and their values left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([a for a in lines if is_override(a)])


def with_recorded(args: list[str]) -> list[str]:
    """`args` after the overrides the resumed run recorded, less those `args` set again (and the
    recorded `ckpt_path`); sets `note`. Unchanged when `args` resume nothing or do not parse."""
    global note
    from hydra.errors import HydraException

    run = resumed_run(args)
    record = newest_record(run) if run else None
    if record is None:
        return args
    try:
        given = parsed(args)
    except HydraException:  # Hydra says what is wrong
        return args
    try:
        recorded = parsed(yaml.safe_load(record.read_text()) or [])
    except (HydraException, yaml.YAMLError, TypeError) as e:
        sys.exit(
            f"sdtrain-train: {record} cannot be read ({e}); fix or remove it (it lists the run's overrides)"
        )
    keys = {o.get_key_element() for o in given}
    kept = [o for o in recorded if o.get_key_element() not in keys | {"ckpt_path"}]
    if rank() == "0":  # the other ranks of torchrun or SLURM reuse the same, silently
        note = describe(record, kept, changes(recorded, given))
    # one run, in its folder, even where the record is a sweep's trial (hparams_search=... sets
    # hydra.mode=MULTIRUN, and would launch the whole sweep again)
    mode = [] if "hydra.mode" in keys else ["hydra.mode=RUN"]
    return [*(o.input_line for o in kept), *args, *mode]


def changes(recorded: list[Any], given: list[Any]) -> list[str]:
    """The given overrides that differ from the record, each with what the record had."""
    before = {o.get_key_element(): o.input_line for o in recorded}
    out = []
    for o in given:
        key = o.get_key_element()
        if key == "ckpt_path" or key.startswith("hydra.") or before.get(key) == o.input_line:
            continue
        was = before.get(key)
        out.append(o.input_line + (f" (was {was.split('=', 1)[-1]})" if was else ""))
    return out


def describe(record: Path, kept: list[Any], changed: list[str]) -> str | None:
    """The log line of a resume: the recorded overrides it reuses and the new ones on top."""
    parts = []
    if kept:
        parts.append(
            f"reusing the overrides recorded in {record}: " + " ".join(o.input_line for o in kept)
        )
    if changed:
        parts.append("new on top: " + " ".join(changed))
    return "resume: " + "; ".join(parts) if parts else None


def resume_record(args: list[str]) -> list[str]:
    """`args`, plus `hydra.output_subdir=.hydra/resume-<n>` when they resume a run in its folder.

    Hydra writes the composed config and overrides to `<run>/.hydra/`; a resume with
    `hydra.run.dir=<run> ckpt_path=...` would overwrite the first run's. Its record goes beside
    it instead, numbered from 1. Only rank 0 of a torchrun or SLURM launch writes one (the others
    get `hydra.output_subdir=null`, as Lightning gives the processes it starts itself).
    """
    keys = {o.key_or_group for o in plain_overrides(args)}
    run = resumed_run(args)
    if run is None or "hydra.output_subdir" in keys:
        return args
    if rank() != "0":
        return [*args, "hydra.output_subdir=null"]
    taken = [p.name for p in (run / ".hydra").glob("resume-*")]
    n = 1 + max((int(t[7:]) for t in taken if t[7:].isdigit()), default=0)
    return [f"hydra.output_subdir=.hydra/resume-{n}", *args]


def forget_record() -> None:
    """Remove this start's own record when it resumed a run and stopped on a config mistake
    before training: the next resume then reads the record of a start that ran, not one that
    failed (whose bad value it would inherit)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if str(hc.output_subdir or "").startswith(".hydra/resume-"):
        shutil.rmtree(Path(hc.runtime.output_dir) / hc.output_subdir, ignore_errors=True)


def rank() -> str:
    """This process's rank under torchrun or SLURM ("0" otherwise)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def run_dir_given() -> bool:
    """Whether this Hydra run's folder was named on the command line (`hydra.run.dir=...`); True
    outside a Hydra run, and in a sweep, where there is nothing to add."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.MULTIRUN:
        return True
    return "hydra.run.dir" in {
        o.key_or_group for o in plain_overrides(list(HydraConfig.get().overrides.hydra))
    }


def no_checkpoint(cfg: DictConfig, path: Path) -> str:
    """Why `ckpt_path` finds no checkpoint at `path`. `ckpt_path=last` in a folder this start made
    itself (no `hydra.run.dir`) names the way on: the run folder to add, the newest one beside it
    that holds a `checkpoints/last.ckpt` as the example."""
    plain = f"ckpt_path: {path} is not a file (nor a sharded checkpoint folder)"
    here = Path(cfg.paths.output_dir).absolute()
    inside = path.absolute().is_relative_to(here)  # not a checkpoint folder set elsewhere
    if cfg.get("ckpt_path") != "last" or not inside or run_dir_given():
        return plain
    runs = [
        p
        for p in (here.parent.iterdir() if here.parent.is_dir() else [])
        if p != here and not p.is_symlink() and (p / "checkpoints" / "last.ckpt").exists()
    ]
    newest = max(
        runs, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime, default=None
    )
    example = shown(newest) if newest else f"{shown(here.parent)}/<run>"
    return (
        "ckpt_path=last resumes the run in the folder hydra.run.dir names (its "
        f"checkpoints/last.ckpt), and none was given: add hydra.run.dir=<run folder>, e.g. "
        f"hydra.run.dir={example}"
    )


def shown(path: Path) -> str:
    """`path` relative to the working folder when under it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
