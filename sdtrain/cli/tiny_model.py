"""`sdtrain-tiny-model`: the command line of `sdtrain.demo.tiny` and `sdtrain.demo.tiny_sdxl`
(their docstrings are the --help)."""

from __future__ import annotations

import argparse
import logging

from sdtrain.demo import tiny, tiny_sdxl
from sdtrain.demo.make import FAMILIES, make_tiny


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=f"{tiny.__doc__}\n{tiny_sdxl.__doc__}",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("out", help="folder to write (created)")
    p.add_argument(
        "--family", default="sd", choices=FAMILIES, help="sd (SD-1.x layout, the default) or sdxl"
    )
    p.add_argument("--resolution", type=int, default=32, help="image size in pixels")
    p.add_argument("--vae-steps", type=int, default=300, help="autoencoder fit steps")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_tiny(a.out, a.family, a.resolution, a.vae_steps, a.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
