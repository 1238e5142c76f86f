"""Training throughput of sdtrain's real module on an SD-1.5-shaped random model (no download).

    python scripts/benchmark.py --out bench.json                      # 256 px b64 and 512 px b16
    python scripts/benchmark.py --cases 512x32 --steps 30 --warmup 10

Each case runs the real StableDiffusionModule (VAE encode + CLIP + U-Net forward/backward + AdamW)
in a Lightning Trainer in bf16-mixed on synthetic batches held on the GPU, so the data loader is out
of the measurement. Prints a table (images/s, ms/step, U-Net TFLOP/s from the per-image costs in
DESIGN.md: 0.54 TFLOP at 256 px, 2.41 at 512 px) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

UNET_TFLOP_PER_IMAGE = {256: 0.54, 512: 2.41}  # training (fwd + bwd), SD-1.5 U-Net


def build_sd15_shaped(out: Path) -> Path:
    """A random model with SD-1.5's U-Net, VAE and CLIP ViT-L/14 text encoder shapes."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrain.models import assemble_pipeline
    from sdtrain.tiny import build_tokenizer

    tok = build_tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # defaults = SD-1.5 blocks
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assemble_pipeline(vae, text, tok, unet, sched).save_pretrained(out)
    return out


class SyntheticBatches(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.steps = trainer.global_step - self.warmup

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.t1 = time.perf_counter()


def run_case(folder: Path, res: int, bs: int, steps: int, warmup: int) -> dict:
    from sdtrain.models import load_parts, tokenize
    from sdtrain.module import StableDiffusionModule

    model = StableDiffusionModule(load_parts(folder), optimizer=partial(torch.optim.AdamW, lr=1e-5))
    ids = tokenize(model.tokenizer, ["a photograph of an astronaut riding a horse"] * bs)
    batch = {"pixels": torch.rand(bs, 3, res, res) * 2 - 1, "input_ids": ids}
    loader = torch.utils.data.DataLoader(SyntheticBatches(batch), batch_size=None)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=loader)
    secs = timer.t1 - timer.t0
    img_s = timer.steps * bs / secs
    tflop = UNET_TFLOP_PER_IMAGE.get(res)
    return {
        "resolution": res,
        "batch_size": bs,
        "steps": timer.steps,
        "img_per_s": round(img_s, 1),
        "ms_per_step": round(1e3 * secs / timer.steps, 1),
        "unet_tflop_s": round(img_s * tflop, 1) if tflop else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "device": torch.cuda.get_device_name(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["256x64", "512x16"], help="RESxBATCH")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", help="JSON file for the results")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_sd15_shaped(Path(tmp) / "sd15-shaped")
        for case in a.cases:
            res, bs = map(int, case.split("x"))
            rows.append(run_case(folder, res, bs, a.steps, a.warmup))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{'res':>5} {'batch':>5} {'img/s':>8} {'ms/step':>8} {'U-Net TFLOP/s':>14} {'peak GiB':>9}"
    )
    for r in rows:
        print(
            f"{r['resolution']:>5} {r['batch_size']:>5} {r['img_per_s']:>8} {r['ms_per_step']:>8} "
            f"{r['unet_tflop_s'] or '-':>14} {r['peak_mem_gib']:>9}   {r['device']}"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
