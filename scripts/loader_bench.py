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
`--warmup` batches, then times `--batches` more (and on for at least `--min-seconds`). Prints a table and the workers a GPU needs at
150 images/s (SD, 512 px) and at 15 images/s (SDXL, 1024 px): ceil(rate / per-worker rate).

Shards, the model folder made for the loader and the servers: scripts/bench_shards.py (what the
images look like, and why).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

from bench_shards import build_data, has_moto, http_server, s3_server, shard_url  # scripts/ on path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
KINDS = ("images-sd", "images-sdxl", "latents-sd", "latents-sdxl")
SOURCES = ("local", "http", "s3")
GPU_RATE = {"sd": 150, "sdxl": 15}  # images/s one GPU trains at: SD at 512 px, SDXL at 1024 px


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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes `pids` have used (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: stat's fields 14 and 15
    return total / os.sysconf("SC_CLK_TCK")


def measure(dm, warmup: int, batches: int, min_seconds: float) -> dict:
    """Wall seconds, the workers' CPU seconds and the samples of `batches` batches (more until
    `min_seconds` have passed) after `warmup` (workers started, shuffle buffers filled), and the
    first batch's image tensor shape."""
    from sdtrain.datamodules import batch as B

    dm.setup("fit")
    it = iter(dm.train_dataloader())
    try:
        first = next(it)
        image = first.get(B.PIXELS, first.get(B.LATENT_DIST))
        for _ in range(warmup - 1):
            next(it)
        pids = [w.pid for w in it._workers]
        t0, cpu0, samples = time.perf_counter(), cpu_seconds(pids), 0
        while batches > 0 or time.perf_counter() - t0 < min_seconds:
            samples += len(next(it)[B.CAPTIONS])
            batches -= 1
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
        return dict(seconds=wall, cpu_seconds=cpu, samples=samples, shape=list(image.shape))
    finally:
        it._shutdown_workers()  # the workers go now, not at garbage collection


def bench(kind: str, source: str, url: str, data: dict, workers: int, a) -> dict:
    """One measurement: per_worker from wall time (this machine, shared as it is), per_core
    from the workers' CPU time (what a worker with a core to itself makes)."""
    folder, model, px, per_sample = data[kind]
    dm = datamodule(overrides(kind, url, model, px, workers, a))
    m = measure(dm, max(a.warmup, 2 * workers), max(a.batches, 3 * workers), a.min_seconds)
    rate = m["samples"] / m["seconds"]
    row = dict(kind=kind, px=px, source=source, workers=workers, batch=a.batch_size)
    row |= dict(samples=m["samples"], seconds=round(m["seconds"], 2))
    row |= dict(samples_per_s=round(rate, 1), per_worker=round(rate / workers, 1))
    row |= dict(per_core=round(m["samples"] / max(m["cpu_seconds"], 1e-3), 1))
    row |= dict(
        kb_per_sample=round(per_sample / 1024, 1), mb_per_s=round(rate * per_sample / 2**20, 1)
    )
    row |= dict(shape=m["shape"], url=url)
    print(json.dumps(row), flush=True)
    return row


def workers_needed(rows: list[dict]) -> list[dict]:
    """Per kind and source, from its row of fewest workers: ceil(GPU rate / per-core rate), the
    workers a GPU needs with a core each, and ceil(GPU rate / per-worker wall rate) as measured
    on this machine (shared: a worker got less than a core)."""
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rate = GPU_RATE[kind.split("-")[1]]
        for source in dict.fromkeys(r["source"] for r in rows if r["kind"] == kind):
            mine = [r for r in rows if (r["kind"], r["source"]) == (kind, source)]
            row = min(mine, key=lambda r: r["workers"])
            out.append(
                dict(kind=kind, source=source, gpu_rate=rate, per_core=row["per_core"],
                     workers=math.ceil(rate / row["per_core"]), per_worker=row["per_worker"],
                     workers_here=math.ceil(rate / row["per_worker"]))
            )  # fmt: skip
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
    load = [round(x, 1) for x in os.getloadavg()]  # 1, 5, 15 min: how shared the CPU was
    return {"rows": rows, "workers_needed": workers_needed(rows), "cpu": cpu_name(), "load": load}


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return f"{os.cpu_count()} CPUs"


def table(result: dict) -> str:
    lines = [
        "| shards | px | source | workers | samples/s | per worker | per core | KB/sample | MB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['kind']} | {r['px']} | {r['source']} | {r['workers']} | {r['samples_per_s']} "
            f"| {r['per_worker']} | {r['per_core']} | {r['kb_per_sample']} | {r['mb_per_s']} |"
        )
    lines += ["", "| shards | source | GPU images/s | per core | workers (a core each) | "
              "per worker here | workers here |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for n in result["workers_needed"]:
        lines.append(
            f"| {n['kind']} | {n['source']} | {n['gpu_rate']} | {n['per_core']} | {n['workers']} "
            f"| {n['per_worker']} | {n['workers_here']} |"
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
    p.add_argument("--min-seconds", type=float, default=4.0, help="time at least this long")
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
