"""`sdtrain-shards`: the command line of `sdtrain.artifacts.shards` (its docstring is the --help)."""

from __future__ import annotations

import argparse
import sys

from sdtrain.artifacts import shards as shards_module
from sdtrain.artifacts.shards import BadFile, report, write_shards


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=shards_module.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("src", help="folder of images with captions (nested folders are read too)")
    p.add_argument("out", help="folder for the .tar shards (created)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-shard-mb", type=float, default=1000.0)
    p.add_argument(
        "--allow-missing-captions",
        action="store_true",
        help="write uncaptioned images (training skips them) instead of leaving them out",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop on the first unreadable or uncaptioned file instead of reporting them at the end",
    )
    p.add_argument(
        "--keep-order",
        action="store_true",
        help="write the images in sorted path order instead of a random order (see --seed)",
    )
    p.add_argument("--seed", type=int, default=0, help="the random order's seed (default 0)")
    a = p.parse_args(argv)
    left_out: list[BadFile] = []
    try:
        shards = write_shards(
            a.src,
            a.out,
            a.samples_per_shard,
            a.max_shard_mb,
            a.allow_missing_captions,
            strict=a.strict,
            left_out=left_out,
            shuffle=not a.keep_order,
            seed=a.seed,
        )
    except (OSError, ValueError) as e:
        if left_out:
            print(report(left_out), file=sys.stderr)
        raise SystemExit(f"sdtrain-shards: {e}") from e
    n = len(shards)
    print(f"wrote {n} shard(s): {a.out}/{{00000..{n - 1:05d}}}.tar")
    if left_out:
        print(report(left_out), file=sys.stderr)


if __name__ == "__main__":
    main()
