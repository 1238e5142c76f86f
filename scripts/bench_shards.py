"""Shards for the loader benchmarks, and servers of them: photo-like JPEG shards in img2dataset's
layout, latent caches of them written by `sdtrain-cache-latents`, a model folder made for the
loader alone, Python's `http.server` and moto's S3 server (subprocesses) serving a folder.
Used by scripts/loader_bench.py and scripts/benchmark.py (--serve-http).

The images: a 4x4 grid of random colours upsampled (light and large areas), 4-8 filled ellipses
and boxes (objects, hard edges), a slight blur, then texture at three scales (noise upsampled from
1/16, 1/4 and full size); JPEG quality 90: ~77 KB at 512 px and ~300 KB at 1024 px, as LAION's
photos are (~50-150 KB at 512 px). Random noise would compress far worse and decode slower.
The model folder: the real tokenizers' layout (a local BPE), a VAE that downsamples 8x to 4
channels and text encoders of the released widths (768; SDXL 768 + 1280 with a 1280 projection)
at one layer, so the cached arrays have SD's and SDXL's real shapes and sizes, made in seconds on
a CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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

    from sdtrain.demo.tiny import token_fields

    cfg = CLIPTextConfig(
        hidden_size=width,
        intermediate_size=width,
        num_hidden_layers=1,
        num_attention_heads=width // 64,
        hidden_act=act,
        projection_dim=width,
        **token_fields(tokenizer),
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
    """{kind: (local folder, model folder, px, bytes per sample)} for `kinds`
    ("images-sd", "latents-sdxl", ...: images or latents, then the family)."""
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


def has_moto() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True
