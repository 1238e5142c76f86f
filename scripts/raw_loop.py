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

    from sdtrain.callbacks.throughput import unet_train_flops
    from sdtrain.models.families import detect
    from sdtrain.models.parts import tokenize

    family = detect(a.folder)
    cuda = torch.cuda.is_available()
    dev, bf16 = torch.device("cuda" if cuda else "cpu"), torch.bfloat16
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from sdtrain.models.speed import set_attention

    # model.drop_layout_copies, model.fuse_projections, model.attention_pad_heads
    drop_copies, fuse, pad = True, False, None
    for x in a.extra:  # the pipeline overrides the plain loop takes too
        if x.startswith("model.attention="):
            set_attention(None if x.split("=", 1)[1] in ("null", "None") else x.split("=", 1)[1])
        if x.startswith("model.drop_layout_copies="):
            drop_copies = x.split("=", 1)[1].lower() == "true"
        if x.startswith("model.fuse_projections="):
            fuse = x.split("=", 1)[1].lower() == "true"
        if x.startswith("model.attention_pad_heads="):
            pad = None if x.split("=", 1)[1] in ("null", "None") else int(x.split("=", 1)[1])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = fast
    checkpointing = "model.gradient_checkpointing=true" in a.extra
    graphs = cuda and "model.cuda_graphs=true" in a.extra  # model.compile's regions as CUDA graphs
    # train mode, as diffusers' training examples set it: from_pretrained returns eval mode, whose
    # graph differs (diffusers' ResNets skip their training-mode .contiguous(); no dropout)
    unet = UNet2DConditionModel.from_pretrained(a.folder, subfolder="unet").to(dev).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    ac = DDPMScheduler.from_pretrained(a.folder, subfolder="scheduler").alphas_cumprod.to(dev)
    scale = AutoencoderKL.load_config(a.folder, subfolder="vae")["scaling_factor"]
    h, dim = a.px // 8, unet.config.cross_attention_dim
    flops = unet_train_flops(unet, (1, 4, h, h), (1, 77, dim), family)

    def cond_set() -> dict:  # a cached conditioning: random, of the family's shapes
        c = family.example_condition(unet, torch.randn(a.batch, 77, dim, device=dev, dtype=bf16))
        return {k: torch.randn_like(v) if k != "time_ids" else v + 1024 for k, v in c.items()}

    if fast:  # cached: posterior moments and contexts, several sets so no cache effects
        sets = [
            (torch.randn(a.batch, 8, h, h, device=dev, dtype=bf16), cond_set()) for _ in range(4)
        ]
        unet.to(memory_format=torch.channels_last)
        from sdtrain.models.speed import compile_unet

        if fuse or pad:
            from sdtrain.models.attention import fuse_projections

            fuse_projections(unet, fuse, pad)

        compile_unet(unet, a.compile, drop_layout_copies=drop_copies, cuda_graphs=graphs)
    else:
        vae = AutoencoderKL.from_pretrained(a.folder, subfolder="vae").to(dev, bf16)
        text, tokenizer = family.load_text(a.folder)
        text = text.to(dev, bf16)
        ids = tokenize(tokenizer, ["a photograph of an astronaut riding a horse"] * a.batch)
        sets = [
            (torch.rand(a.batch, 3, a.px, a.px, device=dev) * 2 - 1, ids.to(dev)) for _ in range(2)
        ]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=fast and cuda)

    px2 = (a.px, a.px)
    size = torch.tensor([px2] * a.batch)

    def step(i: int) -> None:
        x, c = sets[i % len(sets)]
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            if fast:
                mean, logvar = x.float().chunk(2, dim=1)
                lat = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * scale
                cond = c
            else:
                lat = vae.encode(x.to(bf16)).latent_dist.sample().float() * scale
                cond = family.condition(text, c)
                sizes = {"original_size": size, "crop_top_left": size * 0}  # (B, 2) each
                cond.update(
                    {k: v.to(dev) for k, v in family.batch_conditioning(sizes, px2).items()}
                )
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (a.batch,), device=dev)
        s = ac[t].view(-1, 1, 1, 1)
        noisy = s.sqrt() * lat + (1 - s).sqrt() * noise
        if fast:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=bf16):
            pred = unet(noisy, t, **family.unet_inputs(cond)).sample
        F.mse_loss(pred.float(), noise).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync()
    t0 = time.perf_counter()
    for i in range(a.warmup):
        step(i)
        sync()
        print(f"warm-up step {i}: {time.perf_counter() - t0:.1f} s", flush=True)
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(i)
    sync()
    secs = time.perf_counter() - t0
    img_s = a.steps * a.batch / secs
    return {
        "img_per_s": img_s,
        "flops_per_img": flops,
        "warmup_s": warm_s,
        "data_wait_frac": 0.0,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0,
    }
