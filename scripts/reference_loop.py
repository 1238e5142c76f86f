"""A minimal text-to-image diffusion training loop in plain diffusers + torch: the parity yardstick.

    from scripts.reference_loop import train_reference, save
    unet = train_reference("tiny-sd", images, captions, steps=300, batch_size=32, lr=1e-3,
                           caption_dropout=0.1, seed=0, device="cpu")
    save("tiny-sd", unet, "tiny-sd-reference")   # a full diffusers folder with the trained U-Net

Deliberately the textbook recipe and nothing more: fp32, AdamW (default betas, weight decay 1e-2),
constant LR, no gradient clipping, no EMA, no augmentation; uniform timesteps, MSE on the epsilon or
v target, the empty caption with probability `caption_dropout`. Data is an in-memory list,
reshuffled every epoch. Whatever sdtrain does beyond this must not make it learn worse.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (N, 3, H, W) float32 in [-1, 1], the range the SD VAE expects."""
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_reference(
    model_dir: str | Path,
    images: list[Image.Image],
    captions: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    caption_dropout: float,
    seed: int,
    device: str | torch.device,
):
    """Train the U-Net of the diffusers folder `model_dir` on (image, caption) pairs; return it."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)  # U-Net-side randomness: VAE posterior sample, noise, timesteps
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    text_encoder.to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)

    def tokenize(texts: list[str]) -> torch.Tensor:  # (B, 77) token ids
        return tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    n, num_t = len(images), scheduler.config.num_train_timesteps
    if n < batch_size:
        raise ValueError(f"{n} images cannot fill one batch of {batch_size}")
    # The frozen parts are deterministic: their outputs are computed once, not every step (the
    # same numbers; a posterior sample is still drawn every step from the stored mean and std).
    with torch.no_grad():
        pixels = to_pixels(images)  # (N, 3, H, W)
        dists = [vae.encode(x.to(device)).latent_dist for x in pixels.split(256)]
        mean = torch.cat([d.mean for d in dists])  # (N, 4, H/f, W/f)
        std = torch.cat([d.std for d in dists])
        texts = sorted(set(captions)) + [""]
        contexts = text_encoder(tokenize(texts).to(device))[0]  # (K + 1, 77, D)
    which = torch.tensor([texts.index(c) for c in captions])  # (N,) caption index of each image
    empty = len(texts) - 1
    gen = torch.Generator().manual_seed(seed)  # data order and caption dropout
    step, t0, losses = 0, time.perf_counter(), []
    while step < steps:
        perm = torch.randperm(n, generator=gen)  # a fresh order every epoch
        for i in range(0, n - batch_size + 1, batch_size):  # last partial batch dropped
            if step == steps:
                break
            idx = perm[i : i + batch_size]
            batch_text = which[idx].clone()
            batch_text[torch.rand(batch_size, generator=gen) < caption_dropout] = empty
            context = contexts[batch_text.to(device)]  # (B, 77, D)
            m, s = mean[idx.to(device)], std[idx.to(device)]
            latents = (m + s * torch.randn_like(m)) * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, num_t, (batch_size,), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            if scheduler.config.prediction_type == "epsilon":
                target = noise
            else:  # v_prediction
                target = scheduler.get_velocity(latents, noise, t)
            loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # no GPU sync per step
            step += 1
            if step % max(1, steps // 10) == 0 or step == steps:
                secs = time.perf_counter() - t0
                log.info(
                    "reference step %d/%d: loss %.4f, %.0f s",
                    step,
                    steps,
                    torch.stack(losses).mean(),
                    secs,
                )
                losses = []
    return unet.eval()


def save(model_dir: str | Path, unet, out: str | Path) -> Path:
    """Write `out`: a copy of the diffusers folder `model_dir` with `unet` as its U-Net."""
    out = Path(out)
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("unet"))
    unet.save_pretrained(out / "unet")
    return out
