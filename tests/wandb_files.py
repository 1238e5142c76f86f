"""Read an offline W&B run back from its files (the .wandb record log), as W&B's sync would."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

BLOCK = 32 * 1024  # LevelDB log format: 32 KiB blocks, 7-byte record headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


RUN_FOLDER = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-([0-9a-z]+)(?:-\d+)?$")


def run_id(folder: Path) -> str:
    """The run id in a W&B run folder's name; W&B adds `-1`, `-2` when a folder of that second exists."""
    match = RUN_FOLDER.match(folder.name)
    assert match, f"{folder} is no W&B run folder"
    return match.group(1)


def records(path: Path):
    """Yield the protobuf Records of a `run-*.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is no W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            chunks = [payload]
        elif kind in (FIRST, MIDDLE):
            pending += payload
            continue
        elif kind == LAST:
            chunks, pending = [pending + payload], b""
        else:  # zero padding at the end of a block
            continue
        for chunk in chunks:
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            yield rec


def history(run_dir: Path) -> list[dict]:
    """Every logged history row of the offline run in `run_dir` (an offline-run-* folder)."""
    (run_file,) = run_dir.glob("run-*.wandb")
    rows = []
    for rec in records(run_file):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
    return rows


def run_record(run_dir: Path):
    """The run's own record (id, group, name, config) in the offline run in `run_dir`."""
    (run_file,) = run_dir.glob("run-*.wandb")
    return next(r.run for r in records(run_file) if r.WhichOneof("record_type") == "run")


def offline_run(save_dir: Path) -> Path:
    runs = sorted((save_dir / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {save_dir / 'wandb'}"
    return runs[-1]
