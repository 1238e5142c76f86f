"""How fast sdtrain's loader feeds a GPU, alone (no model): samples/s per DataLoader worker.

    python scripts/loader_bench.py --work /tmp/loader-bench --workers 1 2 --json loader.json

Builds in --work (once, reused): image shards in img2dataset's layout (KEY.jpg, KEY.txt, KEY.json)
of photo-like synthetic JPEGs at 512 px (SD) and 1024 px (SDXL), and latent caches of them written
by `sdtrain-cache-latents --text` (the `data=latents` format: fp16 VAE posterior moments and text
contexts, SDXL's pooled embedding). Then serves --work over HTTP (Python's `http.server`, a
subprocess) and S3 (moto's server, a subprocess, when `moto[server]` is installed) and, for each
kind of shard, each source (local disk, http://, s3://) and each worker count, builds the train
dataloader from conf/ exactly as `sdtrain-train` does (Hydra compose of train.yaml with `data=webdataset`
or `data=latents`, so the decode, resize, crop, tokenizer and collate are a run's own), reads
`--warmup` batches, then times `--batches` more. Prints a table and the workers a GPU needs at
150 images/s (SD, 512 px) and at 15 images/s (SDXL, 1024 px): ceil(rate / per-worker rate).

The images: a 4x4 grid of random colours upsampled (light and large areas), 4-8 filled ellipses
and boxes (objects, hard edges), a slight blur, then texture at three scales (noise upsampled from
1/16, 1/4 and full size); JPEG quality 90: ~77 KB at 512 px and ~300 KB at 1024 px, as LAION's
photos are (~50-150 KB at 512 px). Random noise would compress far worse and decode slower.
The model folder is made for the loader only: the real tokenizers' layout (a local BPE), a VAE
that downsamples 8x to 4 channels and text encoders of the released widths (768; SDXL 768 + 1280
with a 1280 projection) at one layer, so the cached arrays have SD's and SDXL's real shapes and
sizes, made in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
KINDS = ("images-sd", "images-sdxl", "latents-sd", "latents-sdxl")
SOURCES = ("local", "http", "s3")
GPU_RATE = {"sd": 150, "sdxl": 15}  # images/s one GPU trains at: SD at 512 px, SDXL at 1024 px
WORDS = (
    "a photo of the old red barn in a green field at sunset with mountains behind it, "
    "close-up portrait of a smiling woman wearing a blue scarf, studio lighting, 85mm, "
    "vintage poster of a city street in the rain with neon signs and people walking, "
    "watercolor painting of a small boat on a calm lake surrounded by pine trees"
).split()


# ------------------------------------------------------------------------------- the data


def photo(rng: np.random.Generator, px: int):
    """A photo-like RGB image, `px` square (see the module's docstring for what it holds)."""
    from PIL import Image, ImageDraw, ImageFilter

    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((px, px), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):
        x, y = (int(v) for v in rng.integers(0, px, 2))
        w, h = (int(v) for v in rng.integers(px // 10, px // 2, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + w, y + h], fill=fill)
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(px / 256)), dtype=np.float32)
    for scale, amplitude in ((16, 18.0), (4, 10.0), (1, 5.0)):  # texture: foliage, fabric, grain
        noise = rng.standard_normal((px // scale, px // scale)).astype(np.float32)
        a += (
            amplitude
            * np.asarray(Image.fromarray(noise).resize((px, px), Image.BICUBIC))[..., None]
        )
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def write_image_shards(out: Path, px: int, count: int, per_shard: int, seed: int = 0) -> Path:
    """`count` photo-like JPEGs with captions as webdataset shards `out/NNNNN.tar` (once)."""
    import webdataset as wds

    if (out / "done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            buf = io.BytesIO()
            photo(rng, px).save(buf, "JPEG", quality=90)
            words = rng.choice(WORDS, int(rng.integers(8, 24)))
            sink.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": buf.getvalue(),
                    "txt": " ".join(words).encode(),
                    "json": json.dumps({"width": px, "height": px}).encode(),
                }
            )
    (out / "done").write_text("")
    return out


def text_encoder(tokenizer, width: int, act: str, projection: bool = False):
    """A one-layer CLIP text encoder of the released `width` (the cached context's size)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width,
        num_hidden_layers=1,
        num_attention_heads=width // 64,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=act,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def loader_model(out: Path, family: str) -> Path:
    """A `family` ("sd" or "sdxl") model folder for the loader (see the module's docstring)."""
    import torch
    from diffusers import AutoencoderKL

    from sdtrain.artifacts.folder import save_folder
    from sdtrain.demo import tiny, tiny_sdxl
    from sdtrain.models.parts import assemble_pipeline
    from sdtrain.models.sdxl import SDXL, TextEncoderPair, TokenizerPair

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    vae = AutoencoderKL(  # 3 downsamples: 8x, 4 latent channels, as SD's and SDXL's VAEs
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    )
    tok = tiny.build_tokenizer()
    if family == "sd":
        text = text_encoder(tok, 768, "quick_gelu")  # CLIP ViT-L/14's width
        unet = tiny.build_unet(8, cross_attention_dim=768)
        pipe = assemble_pipeline(vae, text, tok, unet, tiny.build_scheduler())
    else:
        tok2 = tiny.build_tokenizer()
        tok2.pad_token = "!"  # as SDXL's second tokenizer
        pair = TextEncoderPair(  # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14's widths
            text_encoder(tok, 768, "quick_gelu"), text_encoder(tok2, 1280, "gelu", True)
        )
        vae.register_to_config(force_upcast=True)
        unet = tiny_sdxl.build_unet(8, pair.context_dim, pair.pooled_dim)
        pipe = SDXL.pipeline(vae, pair, TokenizerPair(tok, tok2), unet, tiny.build_scheduler())
    save_folder(pipe, out)
    for sub in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        tiny.write_bpe_files(out / sub)
    return out


def latent_cache(model: Path, shards: Path, out: Path, px: int, per_shard: int) -> Path:
    """`sdtrain-cache-latents SHARDS OUT --text` on the CPU (once)."""
    from sdtrain.cli.cache_latents import main as cache_main

    if not (out / "cache.json").is_file():
        argv = [str(shards), str(out), "--pretrained", str(model), "--resolution", str(px)]
        argv += ["--text", "--accelerator", "cpu", "--num-workers", "0", "--batch-size", "4"]
        cache_main([*argv, "--samples-per-shard", str(per_shard)])
    return out


def build_data(work: Path, kinds: list[str], px: dict[str, int], count: int, per_shard: int):
    """{kind: (local folder, model folder, px, bytes per sample)} for `kinds` (of KINDS)."""
    data = {}
    for family in dict.fromkeys(k.split("-")[1] for k in kinds):
        model = loader_model(work / f"model-{family}", family)
        n = max(1, count * px["sd"] ** 2 // px[family] ** 2)  # fewer of the larger images
        k = max(1, per_shard * px["sd"] ** 2 // px[family] ** 2)
        folders = {
            f"images-{family}": write_image_shards(work / f"images-{px[family]}", px[family], n, k)
        }
        if f"latents-{family}" in kinds:
            out = work / f"latents-{family}-{px[family]}"
            folders[f"latents-{family}"] = latent_cache(
                model, folders[f"images-{family}"], out, px[family], k
            )
        for kind, folder in folders.items():
            size = sum(p.stat().st_size for p in folder.glob("*.tar"))
            data[kind] = (folder, model, px[family], size / n)
    return data


# ------------------------------------------------------------------------------- the servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(root: Path):
    """Python's own `http.server` serving `root` on 127.0.0.1; yields its base url."""
    cmd = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--directory", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # a line per request
        text=True,
    )
    try:
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://...) ..."
        port = re.search(r"port (\d+)", line)
        if port is None:
            raise RuntimeError(f"http.server did not start: {line!r}")
        yield f"http://127.0.0.1:{port.group(1)}"
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def s3_server(root: Path, folders: list[Path], bucket: str = "bench"):
    """moto's S3 server in a subprocess holding `folders` (their files) under
    s3://bucket/NAME/; yields its endpoint url, with test credentials in os.environ meanwhile."""
    import boto3

    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret")
    saved = {k: os.environ.get(k) for k in [*env, "AWS_DEFAULT_REGION"]}
    os.environ.update(env, AWS_DEFAULT_REGION="us-east-1")
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(200):  # up in a few seconds
            with contextlib.suppress(Exception):
                client.create_bucket(Bucket=bucket)
                break
            time.sleep(0.1)
        for folder in folders:
            for f in sorted(folder.iterdir()):
                client.upload_file(str(f), bucket, f"{f.parent.relative_to(root)}/{f.name}")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def shard_url(folder: Path, root: Path, source: str, base: str | None) -> str:
    """`data.train_shards` for `folder`'s shards from `source` (HTTP lists nothing: a brace
    pattern of the names)."""
    if source == "local":
        return f"{folder}/"
    rel = folder.relative_to(root)
    if source == "s3":
        return f"s3://bench/{rel}/"
    names = sorted(p.name for p in folder.glob("*.tar"))  # NNNNN.tar, or RR-NNNNN.tar (a cache)
    first, last = names[0][-9:-4], names[-1][-9:-4]
    return f"{base}/{rel}/{names[0][:-9]}{{{first}..{last}}}.tar"


# ------------------------------------------------------------------------------- the loader


def datamodule(overrides: list[str]):
    """The `data` group of conf/train.yaml with `overrides`, built as `sdtrain-train` builds it."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sdtrain.demo.resolvers import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return hydra.utils.instantiate(cfg.data, _convert_="all")


def overrides(kind: str, url: str, model: Path, px: int, workers: int, a) -> list[str]:
    """The sdtrain-train overrides a run on these shards would give (data and model only)."""
    images = kind.startswith("images")
    return [
        "data=webdataset" if images else "data=latents",
        f"model.pretrained={model}",
        f"data.train_shards='{url}'",
        "data.val_shards=null",
        f"data.resolution={px if images else 'null'}",
        f"data.batch_size={a.batch_size}",
        f"data.num_workers={workers}",
        f"data.shuffle_buffer={a.shuffle_buffer}",
        f"data.remote.endpoint_url={a.endpoint or 'null'}",
    ]


def measure(dm, warmup: int, batches: int) -> tuple[float, int, list[int]]:
    """(seconds, samples) over `batches` batches after `warmup` (workers started, shuffle
    buffers filled), and the first batch's image tensor shape (pixels or latent moments)."""
    from sdtrain.datamodules import batch as B

    dm.setup("fit")
    it = iter(dm.train_dataloader())
    try:
        first = next(it)
        image = first.get(B.PIXELS, first.get(B.LATENT_DIST))
        for _ in range(warmup - 1):
            next(it)
        t0, samples = time.perf_counter(), 0
        for _ in range(batches):
            samples += len(next(it)[B.CAPTIONS])
        return time.perf_counter() - t0, samples, list(image.shape)
    finally:
        it._shutdown_workers()  # the workers go now, not at garbage collection


def bench(kind: str, source: str, url: str, data: dict, workers: int, a) -> dict:
    folder, model, px, per_sample = data[kind]
    dm = datamodule(overrides(kind, url, model, px, workers, a))
    warmup = max(a.warmup, 2 * workers)
    seconds, samples, shape = measure(dm, warmup, max(a.batches, 3 * workers))
    rate = samples / seconds
    row = dict(kind=kind, px=px, source=source, workers=workers, batch=a.batch_size)
    row |= dict(samples=samples, seconds=round(seconds, 2), samples_per_s=round(rate, 1))
    row |= dict(per_worker=round(rate / workers, 1), kb_per_sample=round(per_sample / 1024, 1))
    row |= dict(mb_per_s=round(rate * per_sample / 2**20, 1), shape=shape, url=url)
    print(json.dumps(row), flush=True)
    return row


def workers_needed(rows: list[dict]) -> list[dict]:
    """Per kind and source: ceil(GPU rate / per-worker rate), from the 1-worker row (a core to
    itself) or the fewest workers measured."""
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rate = GPU_RATE[kind.split("-")[1]]
        for source in dict.fromkeys(r["source"] for r in rows if r["kind"] == kind):
            row = min((r for r in rows if (r["kind"], r["source"]) == (kind, source)),
                      key=lambda r: r["workers"])  # fmt: skip
            need = math.ceil(rate / row["per_worker"])
            out.append(dict(kind=kind, source=source, gpu_rate=rate, workers=need,
                            per_worker=row["per_worker"]))  # fmt: skip
    return out


def run(a) -> dict:
    """Build the data, serve it, measure every kind x source x workers; the rows and needs."""
    work = Path(a.work).resolve()
    px = {"sd": a.px, "sdxl": a.px_xl}
    kinds = [k for k in KINDS if k in a.kinds]
    data = build_data(work, kinds, px, a.samples, a.per_shard)
    folders = [data[k][0] for k in kinds]
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        base = {"local": None}
        if "http" in a.sources:
            base["http"] = stack.enter_context(http_server(work))
        if "s3" in a.sources and has_moto():
            a.endpoint = base["s3"] = stack.enter_context(s3_server(work, folders))
        elif "s3" in a.sources:
            print("s3: moto[server] is not installed, skipped", flush=True)
        for kind in kinds:
            for source in (s for s in SOURCES if s in a.sources and s in base):
                url = shard_url(data[kind][0], work, source, base[source])
                rows += [bench(kind, source, url, data, w, a) for w in a.workers]
    return {"rows": rows, "workers_needed": workers_needed(rows), "cpu": cpu_name()}


def has_moto() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return f"{os.cpu_count()} CPUs"


def table(result: dict) -> str:
    lines = [
        "| shards | px | source | workers | samples/s | per worker | KB/sample | MB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['kind']} | {r['px']} | {r['source']} | {r['workers']} | {r['samples_per_s']} "
            f"| {r['per_worker']} | {r['kb_per_sample']} | {r['mb_per_s']} |"
        )
    lines += ["", "| shards | source | GPU images/s | per worker | workers needed |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for n in result["workers_needed"]:
        lines.append(
            f"| {n['kind']} | {n['source']} | {n['gpu_rate']} | {n['per_worker']} | {n['workers']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="/tmp/sdtrain-loader-bench", help="data and models (reused)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--px", type=int, default=512, help="SD's image size")
    p.add_argument("--px-xl", type=int, default=1024, help="SDXL's image size")
    p.add_argument(
        "--samples", type=int, default=256, help="images at --px (fewer at --px-xl: as many pixels)"
    )
    p.add_argument(
        "--per-shard", type=int, default=64, help="samples a shard at --px (fewer at --px-xl)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shuffle-buffer", type=int, default=200, help="samples (raw bytes) a worker")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches (at least 2 x workers)")
    p.add_argument("--batches", type=int, default=12, help="timed batches (at least 3 x workers)")
    p.add_argument("--json", help="write the rows and workers needed here")
    a = p.parse_args(argv)
    a.endpoint = None
    result = run(a)
    print(table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
