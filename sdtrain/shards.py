"""Turn a folder of captioned images into WebDataset shards.

    sdtrain-shards SRC OUT [--samples-per-shard 1000] [--max-shard-mb 1000]

Captions come from `SRC/metadata.jsonl` or `SRC/metadata.csv` (columns `file_name`, `text`), else
from a same-stem `.txt` beside each image. Shards are `OUT/00000.tar`, ... holding `KEY.<ext>`
(the image bytes as they are), `KEY.txt` (the caption) and `KEY.json` (caption and source file),
the layout img2dataset writes, so both train the same way.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def _read_metadata(src: Path) -> dict[str, str] | None:
    """file_name -> caption from metadata.jsonl or metadata.csv, or None when neither exists."""
    jsonl, csv_path = src / "metadata.jsonl", src / "metadata.csv"
    if jsonl.is_file():
        rows = []
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except ValueError as e:
                raise ValueError(f"{jsonl}:{n}: not valid JSON ({e})") from e
        where = jsonl
    elif csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as f:
            rows = list(enumerate(csv.DictReader(f), 2))
        where = csv_path
    else:
        return None
    captions = {}
    for n, row in rows:
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise ValueError(f"{where}:{n}: needs the fields 'file_name' and 'text'")
        if not (src / row["file_name"]).is_file():
            raise FileNotFoundError(f"{where}:{n}: file_name {row['file_name']!r} not in {src}")
        captions[row["file_name"]] = str(row["text"])
    return captions


def captioned_images(src: str | Path, allow_missing: bool = False) -> Iterator[tuple[Path, str]]:
    """Yield (image path, caption) for every image under `src`, in sorted order."""
    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"SRC {src} is not a folder")
    meta = _read_metadata(src)
    images = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    for img in images:
        rel = img.relative_to(src).as_posix()
        if meta is not None:
            caption = meta.get(rel)
        else:
            txt = img.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
        if caption is None and not allow_missing:
            raise ValueError(
                f"{img} has no caption (no {img.with_suffix('.txt').name}"
                f"{' and no metadata row' if meta is not None else ''}); "
                "add one or pass --allow-missing-captions to write it uncaptioned"
            )
        yield img, caption or ""


def write_shards(
    src: str | Path,
    out: str | Path,
    samples_per_shard: int = 1000,
    max_shard_mb: float = 1000.0,
    allow_missing: bool = False,
) -> list[Path]:
    """Write `src`'s captioned images as shards in `out`; return the shard paths."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise FileExistsError(f"OUT {out} already holds .tar shards; choose an empty folder")
    with wds.ShardWriter(
        str(out / "%05d.tar"),
        maxcount=samples_per_shard,
        maxsize=int(max_shard_mb * 1e6),
        verbose=0,
    ) as sink:
        for i, (img, caption) in enumerate(captioned_images(src, allow_missing)):
            key = f"{i:09d}_{re.sub(r'[^A-Za-z0-9_-]', '_', img.stem)}"  # no dots in keys
            ext = img.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            sample = {
                "__key__": key,
                ext: img.read_bytes(),
                "json": json.dumps({"caption": caption, "file_name": str(img)}).encode(),
            }
            if caption:
                sample["txt"] = caption.encode("utf-8")
            sink.write(sample)
    return sorted(out.glob("*.tar"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", help="folder of images with captions")
    p.add_argument("out", help="folder for the .tar shards (created)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-shard-mb", type=float, default=1000.0)
    p.add_argument(
        "--allow-missing-captions",
        action="store_true",
        help="write uncaptioned images (training skips them) instead of failing",
    )
    a = p.parse_args(argv)
    try:
        shards = write_shards(
            a.src, a.out, a.samples_per_shard, a.max_shard_mb, a.allow_missing_captions
        )
    except (OSError, ValueError) as e:
        raise SystemExit(f"sdtrain-shards: {e}") from e
    n = len(shards)
    print(f"wrote {n} shard(s): {a.out}/{{00000..{n - 1:05d}}}.tar")


if __name__ == "__main__":
    main()
