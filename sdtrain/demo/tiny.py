"""Make a tiny random Stable Diffusion in the diffusers folder layout, with nothing downloaded.

    sdtrain-tiny-model OUT [--family sd] [--resolution 32] [--vae-steps 300]

The folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json) loads with
`StableDiffusionPipeline.from_pretrained(OUT)` and through sdtrain's own loader, the same path a
real SD-1.5 folder takes. A random VAE decodes to noise, so the VAE gets a short autoencoder fit on
the demo images (sdtrain.demo.shapes) and its latent scale is measured, as SD's 0.18215 was.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from sdtrain.artifacts.folder import save_folder
from sdtrain.demo import shapes as demo

log = logging.getLogger(__name__)

# Words the tiny tokenizer knows whole; anything else still tokenizes, letter by letter.
WORDS = sorted(
    set(demo.COLOURS) | set(demo.SHAPES) | {"a", "an", "the", "of", "photo", "picture", "and"}
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte maps to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_bpe_files(folder: str | Path, words: list[str] = WORDS) -> tuple[Path, Path]:
    """Write CLIP-style vocab.json and merges.txt: the byte alphabet plus `words` spelled whole."""
    alphabet = list(_bytes_to_unicode().values())
    # Learn merges that spell each word whole (a BPE trained on the word list), CLIP-style "</w>".
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)] * 4, trainer)
    merges = [
        " ".join(m) if isinstance(m, list) else m
        for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def build_tokenizer(words: list[str] = WORDS, max_length: int = 77):
    """A CLIP BPE tokenizer whose vocabulary is the byte alphabet plus `words`, built locally."""
    from transformers import CLIPTokenizer

    # Through files, the one constructor form transformers 4.x and 5.x both take.
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_bpe_files(tmp, words)
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)


def token_fields(tokenizer) -> dict:
    """The CLIP text config's fields that `tokenizer` fixes: vocabulary size, context length
    (position embeddings) and the ids of its special tokens."""
    return dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoder(tokenizer, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        **token_fields(tokenizer),
    )
    return CLIPTextModel(cfg)


def build_vae(resolution: int):
    from diffusers import AutoencoderKL

    # Two blocks: one 2x downsample, so a 32 px image is a (4, 16, 16) latent.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )


def build_unet(latent_size: int, cross_attention_dim: int = 32, **family):
    """The tiny U-Net; `family`: what a model family adds to UNet2DConditionModel's arguments
    (SDXL's conditioning: `sdtrain.demo.tiny_sdxl.build_unet`)."""
    from diffusers import UNet2DConditionModel

    # Three levels, 16 -> 8 -> 4 for the demo's (4, 16, 16) latents, attention only at 8x8 and
    # 4x4 (and the mid block): attention over the 256 positions at 16x16 cost more than half of a
    # training step, and the 4x4 level sees the whole shape at once. Against two levels (32, 64)
    # with attention at 16x16, its forward+backward is 2.2x faster on a CPU, and it learns shapes in
    # fewer steps (demo, guidance 4: 92% of shapes right after 800 steps, against 75%).
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=8,
        cross_attention_dim=cross_attention_dim,
        **family,
    )


def build_scheduler(prediction_type: str = "v_prediction"):
    """SD-1.x's betas. With v-prediction (the demo) rescaled to zero terminal SNR (Lin et al.
    2023): at t=T the input is pure noise, so the image's overall colour must come from the
    prompt, not from a trace of signal left in the noise; the tiny demo learns to follow prompts
    ~5x faster so. With "epsilon", SD-1.x's schedule as it is (the parity glyphs model)."""
    from diffusers import DDPMScheduler

    v = prediction_type == "v_prediction"
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        rescale_betas_zero_snr=v,
        timestep_spacing="trailing" if v else "leading",
        clip_sample=False,
        steps_offset=1,
    )


def _pixels(images: list) -> torch.Tensor:
    """PIL RGB images -> (N, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images]))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def measure_scale(vae, images: list) -> float:
    """Set (and return) the VAE's latent scaling factor: 1 / std of its latents of `images`, so
    the U-Net sees unit-variance latents, as SD's 0.18215 makes them."""
    with torch.no_grad():
        z = vae.eval().encode(_pixels(images[:256])).latent_dist.sample()
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def fit_vae(
    vae,
    resolution: int,
    steps: int,
    batch_size: int = 16,
    seed: int = 0,
    images: list | None = None,
) -> float:
    """Fit the VAE as an autoencoder on `images` (default: 512 demo images); set and return its
    latent scaling factor."""
    torch.manual_seed(seed)
    if images is None:
        images = [img for img, _ in demo.samples(512, resolution, seed=seed + 1)]
    x_all = _pixels(images)  # (N, 3, H, W) in [-1, 1]
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    vae.train()
    for step in range(steps):
        x = x_all[torch.randint(0, len(x_all), (batch_size,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if done % max(1, steps // 10) == 0 or done == steps:  # every 10%: a few lines
            pct = 100 * done // steps
            log.info("VAE fit: step %d/%d (%d%%), loss %.4f", done, steps, pct, loss.item())
    return measure_scale(vae, images)


def build_parts(resolution: int = 32, vae_steps: int = 0, seed: int = 0):
    """The tiny model's parts in memory (`sdtrain.models.parts.Parts`, `pretrained` None).

    With `vae_steps` 0 the VAE stays random (enough for tests that do not judge images).
    """
    from sdtrain.models.parts import Parts

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    vae = build_vae(resolution)
    if vae_steps:
        fit_vae(vae, resolution, vae_steps, seed=seed)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(resolution // factor, text_encoder.config.hidden_size)
    return Parts(unet, vae, text_encoder, tokenizer, build_scheduler())


def make_tiny_model(out: str | Path, resolution: int = 32, vae_steps: int = 300, seed: int = 0):
    """Write a tiny Stable Diffusion folder to `out` and return its path."""
    from sdtrain.models.parts import assemble_pipeline

    p = build_parts(resolution, vae_steps, seed)
    pipe = assemble_pipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, p.noise_scheduler)
    out = Path(out)
    save_folder(pipe, out)
    # vocab.json + merges.txt too, for transformers versions whose CLIPTokenizer is the slow one.
    write_bpe_files(out / "tokenizer")
    return out
