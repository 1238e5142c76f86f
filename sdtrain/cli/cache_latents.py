"""`sdtrain-cache-latents`: the command line of `sdtrain.artifacts.cache` (its docstring is the --help)."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import lightning as L

from sdtrain.artifacts import cache
from sdtrain.artifacts.cache import DTYPES, LatentEncoder
from sdtrain.datamodules.remote import RemoteSettings, redact
from sdtrain.datamodules.webdataset import (
    CACHE_FILE,
    expand_shards,
)
from sdtrain.models.families import detect
from sdtrain.models.parts import load_frozen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=cache.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "src", help="source shards: a folder, glob or brace pattern (as data.train_shards)"
    )
    p.add_argument("out", help="the cache folder (created; must hold no shards yet)")
    p.add_argument("--pretrained", required=True, help="the diffusers model folder (its vae/)")
    p.add_argument("--resolution", type=int, default=512, help="square size in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="per device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="latent_dist storage")
    p.add_argument(
        "--text",
        action="store_true",
        help="also cache the text conditioning (fp16): contexts, and SDXL's pooled embeddings",
    )
    p.add_argument(
        "--mask",
        choices=["file", "alpha"],
        default=None,
        help="also cache each image's loss mask on the latent grid, as data.mask reads it: "
        "file (KEY.mask.png) or alpha (the image's alpha channel)",
    )
    p.add_argument("--devices", default="1", help="devices per node: a number or 'auto'")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per device")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe:CMD shard urls")
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="an S3-compatible store for s3:// sources (as data.remote.endpoint_url)",
    )
    p.add_argument(
        "--anonymous", action="store_true", help="read a public s3:// bucket without credentials"
    )
    p.add_argument(
        "--retries", type=int, default=3, help="attempts per remote shard after the first"
    )
    return p.parse_args(argv)


def cache_recipe(a: argparse.Namespace) -> dict:
    """What cache.json records of how the cache was made: model, source, size, dtype, options."""
    return {
        "pretrained": str(Path(a.pretrained).expanduser().resolve()),
        "source": a.src
        if a.src.startswith("pipe:")
        else redact(a.src)  # no credentials of a presigned url in cache.json
        if "://" in a.src
        else str(Path(a.src).absolute()),
        "resolution": a.resolution,
        "dtype": a.dtype,
        "text": a.text,
        "mask": a.mask,
    }


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(a.out).expanduser().resolve()
    try:
        remote = RemoteSettings(
            retries=a.retries, endpoint_url=a.endpoint_url, anonymous=a.anonymous
        )
        urls = expand_shards(a.src, a.allow_pipe, remote)
        family = detect(a.pretrained)
        vae, text_encoder, tokenizer, _ = load_frozen(a.pretrained)
    except (OSError, ValueError) as e:
        raise SystemExit(f"sdtrain-cache-latents: {e}") from e
    recipe = cache_recipe(a)
    encoder = LatentEncoder(
        vae,
        text_encoder,
        tokenizer,
        urls,
        out,
        recipe,
        a.batch_size,
        a.num_workers,
        a.samples_per_shard,
        family,
        remote,
    )
    devices = int(a.devices) if a.devices.isdigit() else a.devices
    trainer = L.Trainer(
        accelerator=a.accelerator,
        devices=devices,
        num_nodes=a.num_nodes,
        strategy="ddp" if devices != 1 or a.num_nodes > 1 else "auto",
        precision="32-true",  # the VAE in fp32: fp16 VAEs overflow (diffusers' force_upcast)
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings(
        "ignore", message=r"predict returned None"
    )  # it writes, returns nothing
    try:
        trainer.predict(encoder, return_predictions=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"sdtrain-cache-latents: {e}") from e
    if trainer.is_global_zero:
        info = json.loads((out / CACHE_FILE).read_text())
        print(
            f"cached {info['samples']} samples in {len(info['shards'])} shard(s) in {out}; train "
            f"on them with: sdtrain-train data=latents data.train_shards={out}"
        )


if __name__ == "__main__":
    main()
