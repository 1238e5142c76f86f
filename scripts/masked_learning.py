"""What a floor-0 loss mask leaves unlearned: two runs from one start, with and without masks.

    python scripts/masked_learning.py --model /tmp/tiny-sd [--steps 300] [--json out.json]

The images (32 px, 64 of them) are red on their left half and blue on their right, with a little
noise; each carries a mask of its left half (`KEY.mask.png`). The same tiny model trains on them
twice from the same start, `data.mask=null` and `data.mask=file` at `model.mask_floor=0`, and
before and after each run the denoising loss of a fixed held batch (fixed timesteps 100, 300, ...,
900 and noise) is measured on the latent cells the mask covers ("in") and on those it leaves out
("out"). A masked run should learn the left half as the unmasked run does and leave the right
half's loss about where the untrained model had it.
"""

from __future__ import annotations

import argparse
import io
import json
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from sdtrain.datamodules import batch as B
from sdtrain.datamodules.masks import latent_mask
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.models.loader import load_parts
from sdtrain.training import diffusion
from sdtrain.training.module import StableDiffusionModule

SIDE, IMAGES = 32, 64
TIMESTEPS = (100, 300, 500, 700, 900)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shard(out: Path) -> str:
    """64 images red left, blue right, each with a mask of its left half."""
    rng = np.random.default_rng(0)
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[:, : SIDE // 2] = 255
    path = out / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(IMAGES):
            a = np.zeros((SIDE, SIDE, 3), np.int64)
            a[:, : SIDE // 2], a[:, SIDE // 2 :] = (220, 40, 40), (40, 40, 220)
            a = np.clip(a + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
            sink.write({"__key__": f"{i:03d}", "png": png(Image.fromarray(a)),
                        "txt": b"a picture", "mask.png": png(Image.fromarray(mask))})  # fmt: skip
    return str(path)


def region_losses(m: StableDiffusionModule, batch: dict) -> tuple[float, float]:
    """(masked-in, masked-out) mean squared error of the prediction on `batch`, at TIMESTEPS with
    fixed noise, by the latent cells the mask covers wholly or not at all."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = m.sample_latents(*m.encode_images(batch[B.PIXELS]), g)
        cond = m.text_condition(batch)
        errors = []
        for t in TIMESTEPS:
            tt = torch.full((latents.shape[0],), t)
            noise = torch.randn(latents.shape, generator=g)
            noisy = diffusion.add_noise(m.noise_scheduler.alphas_cumprod, latents, noise, tt)
            target = diffusion.target_for(m.noise_scheduler, latents, noise, tt)
            errors.append(((m(noisy, tt, cond) - target) ** 2).mean(dim=(0, 1)))  # (h, w)
    sq = torch.stack(errors).mean(0)
    cells = latent_mask(batch[B.MASK][:1], sq.shape)[0, 0]
    return sq[cells == 1].mean().item(), sq[cells == 0].mean().item()


def run(model: str, shard: str, mask: str | None, steps: int, held: dict) -> dict:
    """Train from the model's start with or without masks; the region losses before and after."""
    torch.manual_seed(0)
    m = StableDiffusionModule(load_parts(model), optimizer=partial(torch.optim.AdamW, lr=1e-3),
                              caption_dropout=0.0, mask_floor=0.0)  # fmt: skip
    dm = WebDataModule(shard, model, resolution=SIDE, batch_size=8, num_workers=0, mask=mask)
    before = region_losses(m, held)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(m, datamodule=dm)
    after = region_losses(m, held)
    return {"in_before": before[0], "out_before": before[1], "in": after[0], "out": after[1]}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a tiny model folder (sdtrain-tiny-model OUT)")
    p.add_argument("--out", default="masked_learning", help="where the shard is written")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json", default=None, help="also write the table here")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shard = write_shard(out)
    kw = dict(resolution=SIDE, batch_size=16, num_workers=0, resampled=False, shuffle_buffer=1)
    dm = WebDataModule(shard, a.model, center_crop=True, mask="file", **kw)
    dm.setup("fit")
    held = next(iter(dm.train_dataloader()))
    results = {name: run(a.model, shard, mask, a.steps, held)
               for name, mask in (("unmasked", None), ("masked, floor 0", "file"))}  # fmt: skip
    print(f"| run ({a.steps} steps) | in: before | in: after | out: before | out: after |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['in_before']:.3f} | {r['in']:.3f} | {r['out_before']:.3f} "
              f"| {r['out']:.3f} |")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
