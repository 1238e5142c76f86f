"""The learning-parity tasks: what is learned, how it is captioned, and the model it is learned by.

- shapes: the demo's 12 classes ("a red circle", 4 colours x 3 shapes), written interleaved
  (class i % 12), learned by the demo's tiny model (v-prediction, zero terminal SNR). It
  saturates at 2000 x 128 (both trainers ~1.0).
- glyphs: 10 fine-grained letter classes that differ in shape only (scripts/glyphs.py), written
  class by class as a folder sorted by class is, learned by a tiny epsilon-prediction model whose
  VAE was fit on glyphs and whose posterior std is pinned (~3e-7: a sampled latent is the mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtrain.demo import shapes as demo

if __package__:  # imported as scripts.parity_tasks (tests)
    from scripts import glyphs
else:  # run from scripts/
    import glyphs


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    caption: Callable[[int], str]
    render_set: Callable[[int, int], tuple[list, torch.Tensor]]
    make_model: Callable[[Path], Path]
    breakdown: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    n_train: int  # default training set size
    shards: int  # default shard count


# ---- shapes ----------------------------------------------------------------------------------

SHAPE_CLASSES = [(c, s) for c in demo.COLOURS for s in demo.SHAPES]  # demo.samples' order: i % 12


def shape_caption(label: int) -> str:
    colour, shape = SHAPE_CLASSES[label]
    return f"a {colour} {shape}"


def shape_set(n: int, seed: int) -> tuple[list, torch.Tensor]:
    """`n` demo renders (PIL) cycling through the 12 classes, and their labels (n,)."""
    images = [img for img, _ in demo.samples(n, 32, seed=seed)]
    return images, torch.arange(n) % len(SHAPE_CLASSES)


def shape_breakdown(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Colour and shape accuracy apart (class = colour x 3 + shape)."""
    n = len(demo.SHAPES)
    return {
        "colour": (pred // n == labels // n).float().mean().item(),
        "shape": (pred % n == labels % n).float().mean().item(),
    }


def shapes_model(out: Path) -> Path:
    from sdtrain.demo.tiny import make_tiny_model

    return make_tiny_model(out, resolution=32)


# ---- glyphs ----------------------------------------------------------------------------------


def pin_posterior_std(vae, logvar: float = -30.0) -> None:
    """Make the VAE's posterior std exp(logvar / 2) for every image (-30: ~3e-7, diffusers' clamp),
    so a posterior sample is its mean and on-the-fly encoding equals encoding once."""
    conv, c = vae.quant_conv, vae.config.latent_channels
    with torch.no_grad():
        conv.weight[c:].zero_()
        conv.bias[c:].fill_(logvar)


def glyphs_model(out: Path, seed: int = 0, vae_steps: int = 400) -> Path:
    """A tiny epsilon-prediction SD folder for the glyphs (tokenizer knows "the letter ...")."""
    from sdtrain.demo import tiny
    from sdtrain.models.parts import assemble_pipeline

    torch.manual_seed(seed)
    tokenizer = tiny.build_tokenizer(["the", "letter", *(c.lower() for c in glyphs.CLASSES)])
    text_encoder = tiny.build_text_encoder(tokenizer)
    vae = tiny.build_vae(32)
    images, _ = glyphs.render_set(512, seed=seed + 101)
    tiny.fit_vae(vae, 32, vae_steps, seed=seed, images=images)
    pin_posterior_std(vae)
    tiny.measure_scale(vae, images)
    unet = tiny.build_unet(16, text_encoder.config.hidden_size)
    scheduler = tiny.build_scheduler("epsilon")  # SD-1.x's schedule, epsilon-prediction
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    pipe.save_pretrained(out)
    return out


def glyphs_task(classes: int = len(glyphs.CLASSES), jitter: float = 1.0) -> Task:
    """The glyphs task on its first `classes` classes (C, G, O, Q, D, B, P, R, E, F), drawn with
    `jitter` times the default random rotation, shear, offset and blur (a harder task above 1)."""
    if not 2 <= classes <= len(glyphs.CLASSES):
        raise ValueError(f"--classes {classes}: the glyphs task has 2 to {len(glyphs.CLASSES)}")
    return Task(
        "glyphs",
        glyphs.CLASSES[:classes],
        glyphs.caption,
        lambda n, seed: glyphs.render_set(n, seed, classes=classes, jitter=jitter),
        glyphs_model,
        lambda pred, labels: {},
        n_train=180 * classes,
        shards=classes - 1,  # 180 / (1 - 1/classes) a shard: one or two classes in each
    )


SHAPES = Task(
    "shapes",
    tuple(shape_caption(i) for i in range(len(SHAPE_CLASSES))),
    shape_caption,
    shape_set,
    shapes_model,
    shape_breakdown,
    n_train=4800,
    shards=16,
)
TASKS = {
    "shapes": lambda classes=None, jitter=1.0: SHAPES,
    "glyphs": lambda classes=None, jitter=1.0: glyphs_task(classes or len(glyphs.CLASSES), jitter),
}
