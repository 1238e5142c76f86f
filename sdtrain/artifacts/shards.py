"""Turn a folder of captioned images into WebDataset shards.

    sdtrain-shards SRC OUT [--samples-per-shard 1000] [--max-shard-mb 1000] [--strict]
                           [--keep-order] [--seed 0]

Images are found in SRC and every folder below it. Captions come from `SRC/metadata.jsonl` or
`SRC/metadata.csv` (columns `file_name`, `text`, paths relative to SRC), else from a same-stem
`.txt`, else `.caption`, beside each image. Shards are `OUT/00000.tar`, ... holding `KEY.<ext>`
(the image bytes as they are), `KEY.txt` (the caption) and `KEY.json` (caption, source file and
the image's width and height as a viewer shows it), the layout img2dataset writes, so both train
the same way. Images go in in a random order (`--seed`), so each shard is a mix of the folder, as
img2dataset's are of the web; `--keep-order` writes them in sorted path order.

Files that do not open as images, or have no caption, are left out and reported at the end (how
many, and the first few paths): one bad file in a folder of thousands should not cost the rest.
`--strict` stops on the first instead.

A loss mask beside an image, `NAME.mask.png` for `NAME.jpg|png|webp` (white trains, black does
not: `data.mask=file`, `sdtrain.datamodules.masks`), goes into the shard as `KEY.mask.png`;
`*.mask.png` files are masks, never images of their own.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from sdtrain.datamodules.masks import MASK_EXT

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
CAPTION_SUFFIXES = (".txt", ".caption")  # the first that exists beside the image wins
EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image a quarter: width and height swap
REPORT_FIRST = 5  # paths named in the report of files left out
MASK_SUFFIX = f".{MASK_EXT}"  # NAME.mask.png: the loss mask of NAME.jpg|png|webp


def mask_file(img: Path) -> Path:
    """Where the loss mask of image `img` would be: NAME.mask.png beside NAME.<ext>."""
    return img.with_name(img.stem + MASK_SUFFIX)


class BadFile(ValueError):
    """An image that cannot go into the shards; `kind` is "unreadable" or "uncaptioned"."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


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


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as a viewer shows it (EXIF orientation applied).

    Reads the header and checks the file's structure (`Image.verify`) without decoding the pixels,
    so a folder of thousands is checked in seconds. Raises BadFile when the file is no image.
    """
    try:
        with Image.open(path) as img:
            img.verify()  # must come first: the image cannot be used after it
        with Image.open(path) as img:
            (w, h), orientation = img.size, img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as e:  # PIL raises many types for broken files
        why = f"{path} is not a readable image ({type(e).__name__}: {e})"
        raise BadFile(why, "unreadable") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _caption(img: Path, rel: str, meta: dict[str, str] | None) -> str | None:
    """The caption from the metadata row, else the first caption file beside the image."""
    if meta is not None:
        return meta.get(rel)
    for suffix in CAPTION_SUFFIXES:
        if (txt := img.with_suffix(suffix)).is_file():
            return txt.read_text(encoding="utf-8").strip()
    return None


def captioned_images(
    src: str | Path, allow_missing: bool = False, strict: bool = True
) -> Iterator[tuple[Path, str, tuple[int, int]] | BadFile]:
    """Yield (image path, caption, (width, height)) for every image under `src` (nested folders
    too), in sorted order. A file that cannot go in raises BadFile with `strict`, else is yielded
    as its BadFile, for the caller to report. `allow_missing` lets an image in uncaptioned ("")."""
    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"SRC {src} is not a folder")
    meta = _read_metadata(src)
    images = sorted(
        p
        for p in src.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.lower().endswith(MASK_SUFFIX)
    )
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    for img in images:
        try:
            caption = _caption(img, img.relative_to(src).as_posix(), meta)
            if caption is None and not allow_missing:
                looked = " or ".join(img.with_suffix(s).name for s in CAPTION_SUFFIXES)
                raise BadFile(
                    f"{img} has no caption (no {looked}"
                    f"{' and no metadata row' if meta is not None else ''}); "
                    "add one or pass --allow-missing-captions to write it uncaptioned",
                    "uncaptioned",
                )
            size = image_size(img)
        except BadFile as bad:
            if strict:
                raise
            yield bad
            continue
        yield img, caption or "", size


def write_shards(
    src: str | Path,
    out: str | Path,
    samples_per_shard: int = 1000,
    max_shard_mb: float = 1000.0,
    allow_missing: bool = False,
    strict: bool = True,
    left_out: list[BadFile] | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Write `src`'s captioned images as shards in `out`; return the shard paths.

    With `strict=False` files that cannot go in are appended to `left_out` (and logged) instead
    of stopping the run; a folder with no usable image at all is still an error.

    `shuffle` writes the images in a random order drawn from `seed` (the same folder and seed give
    the same shards), so every shard is a mix of the whole folder. In the folder's sorted order a
    folder sorted by class or subject gives shards of one or two classes each; a streaming loader
    mixes only the few shards its shuffle buffer holds, and the classes' shares of the batches
    then drift (docs/parity.md: the glyphs task learned 0.2 less so). False keeps sorted order.
    """
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise FileExistsError(f"OUT {out} already holds .tar shards; choose an empty folder")
    # every file is checked before the first shard opens: a stop leaves OUT without shards
    items = []
    for item in captioned_images(src, allow_missing, strict):
        if isinstance(item, BadFile):
            log.warning("left out: %s", item)
            if left_out is not None:
                left_out.append(item)
        else:
            items.append(item)
    if not items:
        raise ValueError(f"no usable images under {src}: every one was left out")
    if shuffle:
        random.Random(seed).shuffle(items)
    with wds.ShardWriter(
        str(out / "%05d.tar"),
        maxcount=samples_per_shard,
        maxsize=int(max_shard_mb * 1e6),
        verbose=0,
    ) as sink:
        for i, (img, caption, (width, height)) in enumerate(items):
            key = f"{i:09d}_{re.sub(r'[^A-Za-z0-9_-]', '_', img.stem)}"  # no dots in keys
            ext = img.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            meta = {"caption": caption, "file_name": str(img), "width": width, "height": height}
            sample = {"__key__": key, ext: img.read_bytes(), "json": json.dumps(meta).encode()}
            if caption:
                sample["txt"] = caption.encode("utf-8")
            if mask_file(img).is_file():  # its loss mask (data.mask=file)
                sample[MASK_EXT] = mask_file(img).read_bytes()
            sink.write(sample)
    return sorted(out.glob("*.tar"))


def report(left_out: list[BadFile], first: int = REPORT_FIRST) -> str:
    """One line per problem kind and the first `first` files: what the end of a run prints."""
    kinds = Counter(bad.kind for bad in left_out)
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    lines = [f"sdtrain-shards: left out {len(left_out)} file(s) ({counts}); the first:"]
    lines += [f"  {bad}" for bad in left_out[:first]]
    return "\n".join(lines)
