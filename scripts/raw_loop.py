"""The plain training loop of scripts/benchmark.py (its `raw_*` variants), in a module of its own:
what diffusers' example does (VAE + CLIP every step, eager) or, with `fast`, the same loop on cached
inputs held on the GPU with the fast settings (the ceiling the pipeline is measured against)."""

from __future__ import annotations

import argparse
import time

import torch


def raw_loop(a: argparse.Namespace, fast: bool) -> dict:
    """The plain training loop; `fast`: cached inputs and the fast settings."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdtrain.callbacks.throughput import unet_train_flops
    from sdtrain.models.parts import load_tokenizer, tokenize

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    from sdtrain.models.speed import set_attention

    drop_copies, fuse = True, False  # model.drop_layout_copies, model.fuse_projections
    for x in a.extra:  # the pipeline overrides the plain loop takes too
        if x.startswith("model.attention="):
            set_attention(None if x.split("=", 1)[1] in ("null", "None") else x.split("=", 1)[1])
        if x.startswith("model.drop_layout_copies="):
            drop_copies = x.split("=", 1)[1].lower() == "true"
        if x.startswith("model.fuse_projections="):
            fuse = x.split("=", 1)[1].lower() == "true"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = fast
    unet = UNet2DConditionModel.from_pretrained(a.folder, subfolder="unet").to(dev)
    ac = DDPMScheduler.from_pretrained(a.folder, subfolder="scheduler").alphas_cumprod.to(dev)
    h = a.px // 8
    flops = unet_train_flops(unet, (1, 4, h, h), (1, 77, 768))
    if fast:  # cached: posterior moments and contexts, several sets so no cache effects
        sets = [
            (
                torch.randn(a.batch, 8, h, h, device=dev, dtype=bf16),
                torch.randn(a.batch, 77, 768, device=dev, dtype=bf16),
            )
            for _ in range(4)
        ]
        unet.to(memory_format=torch.channels_last)
        from sdtrain.models.speed import compile_unet

        if fuse:
            from sdtrain.models.attention import fuse_projections

            fuse_projections(unet)

        compile_unet(unet, a.compile, drop_layout_copies=drop_copies)
    else:
        vae = AutoencoderKL.from_pretrained(a.folder, subfolder="vae").to(dev, bf16)
        text = CLIPTextModel.from_pretrained(a.folder, subfolder="text_encoder").to(dev, bf16)
        ids = tokenize(
            load_tokenizer(a.folder), ["a photograph of an astronaut riding a horse"] * a.batch
        )
        sets = [
            (torch.rand(a.batch, 3, a.px, a.px, device=dev) * 2 - 1, ids.to(dev)) for _ in range(2)
        ]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=fast)

    def step(i: int) -> None:
        x, c = sets[i % len(sets)]
        with torch.no_grad():
            if fast:
                mean, logvar = x.float().chunk(2, dim=1)
                lat = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * 0.18215
                ctx = c
            else:
                lat = vae.encode(x.to(bf16)).latent_dist.sample().float() * 0.18215
                ctx = text(c)[0]
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (a.batch,), device=dev)
        s = ac[t].view(-1, 1, 1, 1)
        noisy = s.sqrt() * lat + (1 - s).sqrt() * noise
        if fast:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=bf16):
            pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        F.mse_loss(pred.float(), noise).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(a.warmup):
        step(i)
        torch.cuda.synchronize()
        print(f"warm-up step {i}: {time.perf_counter() - t0:.1f} s", flush=True)
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(i)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    img_s = a.steps * a.batch / secs
    return {
        "img_per_s": img_s,
        "flops_per_img": flops,
        "warmup_s": warm_s,
        "data_wait_frac": 0.0,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
    }
