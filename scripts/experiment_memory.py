"""Peak GPU memory of each experiment config, as shipped and with each memory saver on.

    python scripts/experiment_memory.py --json memory.json     # one GPU
    python scripts/experiment_memory.py --tiny                 # CPU dry run: tiny models, no numbers

For each experiment of conf/experiment/ (finetune_sd15, lora, textual_inversion, sdxl_finetune,
sdxl_lora, and dreambooth where it exists), a few real training steps of
`sdtrain-train experiment=X` in a subprocess, at the experiment's own resolution and batch, on
synthetic shapes images (sdtrain-shards) or, for the latent variants, their latent cache
(sdtrain-cache-latents; with --text unless the text encoder trains), with a random model of the
released shapes (scripts/shaped_models.py: SD-1.5's U-Net, VAE and CLIP ViT-L; SDXL base's U-Net,
VAE and both text encoders), loaded in fp32 as runs load them. Each run ends with one round of
the experiment's sampling callback (its size, 2 sampler steps): a run's budget must hold that
too. Checkpoints are off (Lightning's default one too: a full SD-1.5 fine-tune's is 8.5 GB, an
SDXL one's 40 GB, and the disk fills); compile off, as shipped.

Variants (one process each; a saver the experiment already has, or cannot take, is left out):
  shipped    the experiment as it is
  adamw8bit  model.optimizer._target_=bitsandbytes.optim.AdamW8bit
  ema_cpu    model.ema.device=cpu (the EMA in host memory)
  grad_ckpt  model.gradient_checkpointing=true
  latents    data=latents (latents and text cached): no VAE or CLIP in the step, both still on the
             GPU (model.offload_frozen=false)
  offload    data=latents with model.offload_frozen=true: VAE and frozen CLIP in host memory
             between steps (sdtrain/training/offload.py)
  all        every saver the experiment can take at once

Numbers (sdtrain.callbacks.peak_memory): `torch.cuda.max_memory_reserved` in GB, over the steps
and over the whole run (the sampling round included): what PyTorch took from the driver. A card
needs the run's figure plus the CUDA context (~0.5 GB). A table is printed; `--json` writes the
rows (rows of other experiments/variants already in the file are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
EXPERIMENTS = ("finetune_sd15", "lora", "textual_inversion", "sdxl_finetune", "sdxl_lora",
               "dreambooth")  # fmt: skip
SAVERS = ("shipped", "adamw8bit", "ema_cpu", "grad_ckpt", "latents", "offload", "all")
SAVER_OVERRIDES = {
    "adamw8bit": ["model.optimizer._target_=bitsandbytes.optim.AdamW8bit"],
    "ema_cpu": ["model.ema.device=cpu"],
    "grad_ckpt": ["model.gradient_checkpointing=true"],
    "latents": ["model.offload_frozen=false"],
    "offload": ["model.offload_frozen=true"],
}
GB = 1e9


def experiment_config(name: str, extra: list[str] = ()):
    """The composed config of `experiment=name` (what sdtrain-train would run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *extra])


def variants(name: str, cfg) -> dict[str, list[str]]:
    """Each saver's overrides for experiment `name` (config `cfg`), those it can take only."""
    m = cfg.model
    dreambooth = cfg.data.get("dreambooth") is not None  # its own datamodule: no latent cache
    can = {
        "adamw8bit": True,
        "ema_cpu": m.get("ema") is not None and m.ema.get("device") != "cpu",
        "grad_ckpt": not m.get("gradient_checkpointing"),
        "latents": not dreambooth,
        "offload": not dreambooth,
    }
    out = {"shipped": []}
    out |= {s: SAVER_OVERRIDES[s] for s in SAVERS if can.get(s)}
    every = [o for s in ("adamw8bit", "ema_cpu", "grad_ckpt", "offload") if can[s]
             for o in SAVER_OVERRIDES[s]]  # fmt: skip
    out["all"] = every
    return out


def text_trains(cfg) -> bool:
    """Whether the experiment trains the text encoder (its cache then holds no text)."""
    m = cfg.model
    lora_te = bool((m.get("lora") or {}).get("text_encoder"))
    return bool(m.get("train_text_encoder")) or lora_te or m.get("textual_inversion") is not None


def build_model(family: str, work: Path, tiny: bool) -> Path:
    """A random model of the released shapes (tiny: the test-sized models), built once."""
    out = work / f"{family}-{'tiny' if tiny else 'shaped'}"
    if (out / "model_index.json").is_file():
        return out
    t0 = time.perf_counter()
    if tiny and family == "sd":
        from sdtrain.demo.tiny import make_tiny_model

        make_tiny_model(out, vae_steps=0)
    elif tiny:
        from sdtrain.demo.tiny_sdxl import make_tiny_sdxl

        make_tiny_sdxl(out, vae_steps=0)
    else:
        from shaped_models import build_shaped

        build_shaped(family, out)
        torch.cuda.empty_cache()  # built on the GPU: its memory back before the runs
    print(f"built {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def build_data(work: Path, px: int, count: int) -> Path:
    """`count` synthetic shapes images of `px` pixels as shards (sdtrain-shards), made once."""
    from sdtrain.cli.shards import main as shards_main
    from sdtrain.demo import shapes

    out = work / f"shards-{px}-{count}"
    if not (out / "00000.tar").is_file():
        shapes.write_folder(work / f"images-{px}-{count}", count, px)
        shards_main([str(work / f"images-{px}-{count}"), str(out), "--samples-per-shard", "1000"])
    return out


def build_cache(work: Path, shards: Path, model: Path, px: int, text: bool, cpu: bool) -> Path:
    """The latent cache of `shards` by `model`'s VAE (and text encoder(s) with `text`)."""
    out = work / f"latents-{model.name}-{shards.name}{'-text' if text else ''}"
    if (out / "cache.json").is_file():
        return out
    cmd = [sys.executable, "-m", "sdtrain.cli.cache_latents", str(shards), str(out)]
    cmd += ["--pretrained", str(model), "--resolution", str(px), "--batch-size", "4"]
    cmd += ["--num-workers", "0", "--accelerator", "cpu" if cpu else "gpu"]
    subprocess.run(cmd + (["--text"] if text else []), check=True, cwd=ROOT)
    return out


def run(a, name: str, saver: str, common: list[str], own: list[str], work: Path) -> dict:
    """One `sdtrain-train experiment=name` run with the overrides every run has (`common`) and
    this variant's (`own`): its peak memory and how it ended."""
    run_dir = work / "runs" / f"{name}-{saver}"
    peak = run_dir / "peak_memory.json"
    peak.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "sdtrain.cli.train", f"experiment={name}", *common, *own]
    cmd += [f"hydra.run.dir={run_dir}", f"+callbacks.peak_memory.path={peak}",
            "+callbacks.peak_memory._target_=sdtrain.callbacks.peak_memory.PeakMemory"]  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "run.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:  # own process group: a timed-out run leaves nothing behind
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # none asked for: never kept
    row = {"experiment": name, "saver": saver, "overrides": own,
           "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    text = log.read_text()
    if peak.is_file() and proc.returncode == 0:
        got = json.loads(peak.read_text())
        row |= {"status": "ok", "gpu": got.get("gpu")}
        for key in ("steps_reserved", "run_reserved", "steps_allocated", "run_allocated"):
            if key in got:
                row[f"{key}_gb"] = round(got[key] / GB, 2)
    else:
        oom = "OutOfMemoryError" in text or "CUDA out of memory" in text
        row["status"] = "oom" if oom else f"failed ({proc.returncode}, log: {log})"
        if not oom:
            print(text[-3000:], flush=True)
    return row


def experiment_rows(a, name: str, work: Path) -> list[dict]:
    """Every variant of one experiment: its data, cache and model made first."""
    cfg = experiment_config(name)
    family = "sdxl" if name.startswith("sdxl") else "sd"
    model = build_model(family, work, a.tiny)
    px = 32 if a.tiny else int(cfg.data.resolution)
    batch = 2 if a.tiny else int(cfg.data.batch_size)
    shards = build_data(work, px, max(8, 2 * batch))
    common = [f"model.pretrained={model}", f"trainer.max_steps={a.steps}", "trainer.devices=1",
              "logger=none", "~callbacks.model_checkpoint", "+trainer.enable_checkpointing=false",
              "trainer.enable_progress_bar=false",
              "callbacks.sample_images.every_n_steps=0",
              "callbacks.sample_images.num_inference_steps=2", "data.num_workers=2"]  # fmt: skip
    if a.tiny:
        common += ["trainer.accelerator=cpu", "trainer.precision=32", "data.resolution=32",
                   "data.batch_size=2", "data.num_workers=0", "data.bucket_step=8",
                   "callbacks.sample_images.height=32",
                   "callbacks.sample_images.width=32"]  # fmt: skip
    dreambooth = cfg.data.get("dreambooth") is not None
    if dreambooth:  # class images: the synthetic shards too, not drawn by the random model
        common += [f"data.dreambooth.instance_shards={shards}",
                   f"data.dreambooth.class_shards={shards}",
                   "data.dreambooth.class_images.prompt=a photo of a shape"]  # fmt: skip
    images = [f"data.train_shards={shards}"]
    rows = []
    for saver, extra in variants(name, cfg).items():
        if saver not in a.savers:
            continue
        data = [] if dreambooth else images
        if saver in ("latents", "offload", "all") and not dreambooth:
            cache = build_cache(work, shards, model, px, not text_trains(cfg), a.tiny)
            data = ["data=latents", f"data.train_shards={cache}", "data.buckets=null"]  # square
        row = run(a, name, saver, common, data + extra, work)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a table, then each experiment's smallest whole-run figure."""
    lines = [f"{'experiment':<18} {'saver':<10} {'steps GB':>8} {'run GB':>7} {'s':>6}  status"]
    for r in rows:
        steps, whole = r.get("steps_reserved_gb", "-"), r.get("run_reserved_gb", "-")
        lines.append(f"{r['experiment']:<18} {r['saver']:<10} {steps:>8} {whole:>7} "
                     f"{r['wall_s']:>6}  {r['status']}")  # fmt: skip
    lines.append("")
    for name in dict.fromkeys(r["experiment"] for r in rows):
        ok = [r for r in rows if r["experiment"] == name and "run_reserved_gb" in r]
        if ok:
            best = min(ok, key=lambda r: r["run_reserved_gb"])
            lines.append(f"{name}: smallest {best['run_reserved_gb']} GB ({best['saver']})")
    return "\n".join(lines)


def save_json(path: Path, rows: list[dict]) -> None:
    """Write `rows` to `path`, keeping the rows of other (experiment, saver) pairs there."""
    old = json.loads(path.read_text()) if path.is_file() else []
    new = {(r["experiment"], r["saver"]) for r in rows}
    kept = [r for r in old if (r["experiment"], r["saver"]) not in new]
    path.write_text(json.dumps(kept + rows, indent=1) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=None, help="default: all that exist")
    p.add_argument("--savers", nargs="+", default=list(SAVERS), choices=SAVERS)
    p.add_argument("--steps", type=int, default=3, help="training steps per run")
    p.add_argument("--work", help="models, shards and caches (kept: a second call reuses them)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--json", help="write the rows here (other experiments' rows kept)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: no numbers")
    a = p.parse_args(argv)
    names = a.experiments or [
        n for n in EXPERIMENTS if (ROOT / f"conf/experiment/{n}.yaml").is_file()
    ]
    for n in names:
        if not (ROOT / "conf" / "experiment" / f"{n}.yaml").is_file():
            raise SystemExit(f"--experiments: no conf/experiment/{n}.yaml")
    work = Path(a.work or tempfile.mkdtemp(prefix="sdtrain-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [r for n in names for r in experiment_rows(a, n, work)]
    print("\n" + table(rows), flush=True)
    if a.json:
        save_json(Path(a.json), rows)
    return rows


if __name__ == "__main__":
    main()
