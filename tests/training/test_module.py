"""The LightningModule on tiny in-memory parts: loss, frozen parts, the batch contract, the EMA
scope, overfitting one batch."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from sdtrain.artifacts import checkpoint
from sdtrain.datamodules import batch as B
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.demo.tiny import build_parts
from sdtrain.models.loader import load_parts
from sdtrain.training import diffusion
from sdtrain.training.ema import EMA
from sdtrain.training.module import StableDiffusionModule


@pytest.fixture(scope="module")
def batch(shards: str, tiny_model: Path) -> dict:
    dm = WebDataModule(shards, str(tiny_model), resolution=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def make(parts=None, **kw) -> StableDiffusionModule:
    """A module around tiny parts built in memory (no folder, no loader)."""
    return StableDiffusionModule(
        parts or build_parts(32), optimizer=partial(torch.optim.AdamW, lr=3e-3), **kw
    )


def m_step(m: StableDiffusionModule, batch: dict) -> torch.Tensor:
    """training_step without a Trainer attached (logging is a no-op then)."""
    m.log = lambda *a, **k: None
    m.optimizers = lambda: torch.optim.SGD(m.unet.parameters(), lr=0.0)
    m.step_generator = lambda: diffusion.step_generator(0, 0, 0, 0, "cpu")  # same draws each call
    return m.training_step(batch, 0)


@pytest.mark.parametrize(
    "kw, parts_kw",
    [
        ({}, {}),
        ({"min_snr_gamma": 5.0, "noise_offset": 0.1, "caption_dropout": 1.0}, {"eps": True}),
    ],
)
def test_training_step_finite_and_only_unet_learns(batch: dict, kw: dict, parts_kw: dict):
    parts = build_parts(32)
    if parts_kw.get("eps"):
        parts.noise_scheduler.register_to_config(prediction_type="epsilon")
    m = make(parts, **kw)
    m.train()
    assert not m.vae.training and not m.text_encoder.training
    opt = m.configure_optimizers()  # no LR scheduler given: the optimizer alone
    loss = m_step(m, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in m.vae.parameters())
    assert all(p.grad is None for p in m.text_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.unet.parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.unet.parameters()}


def test_batch_contract_every_combination(batch: dict):
    """pixels, latent_dist or latents x input_ids or context: the step encodes only what is
    missing, and a batch of cached latents / contexts trains exactly like the batch it came from."""
    m = make(caption_dropout=0.5)
    m.eval()  # no dropout in the U-Net: equal inputs give equal losses
    captured = {}
    real = m.latents_and_context

    def capture(b, g):
        out = real(b, g)
        captured["latents"], captured["context"] = out[0], out[1]["context"]
        return out

    m.latents_and_context = capture
    reference = m_step(m, {B.PIXELS: batch[B.PIXELS], B.INPUT_IDS: batch[B.INPUT_IDS]})
    m.latents_and_context = real
    with torch.no_grad():
        moments = m.vae.encode(batch[B.PIXELS]).latent_dist.parameters  # what a latent cache holds
    cached = {
        B.LATENTS: captured["latents"],
        B.LATENT_DIST: moments,
        B.CONTEXT: captured["context"],
    }

    def refuse(*a, **k):
        raise AssertionError("encoded something the batch already held")

    vae_encode, text_forward = m.vae.encode, m.text_encoder.forward
    for image in (B.PIXELS, B.LATENT_DIST, B.LATENTS):
        for text in (B.INPUT_IDS, B.CONTEXT):
            b = {
                image: batch[image] if image == B.PIXELS else cached[image],
                text: batch[text] if text == B.INPUT_IDS else cached[text],
                B.SKIPPED: 0,
            }
            m.vae.encode = vae_encode if image == B.PIXELS else refuse
            m.text_encoder.forward = refuse if text == B.CONTEXT else text_forward
            m._empty_context = m.empty_context(1)  # the empty caption is encoded once, up front
            loss = m_step(m, b)
            torch.testing.assert_close(loss, reference, msg=f"{image} + {text}")
    m.vae.encode, m.text_encoder.forward = vae_encode, text_forward
    with pytest.raises(KeyError, match="pixels"):
        m_step(m, {B.INPUT_IDS: batch[B.INPUT_IDS]})
    with pytest.raises(KeyError, match="input_ids"):
        m_step(m, {B.PIXELS: batch[B.PIXELS]})


def test_overfits_one_batch(batch: dict):
    m = make(caption_dropout=0.0)
    m.train()
    opt = m.configure_optimizers()  # no LR scheduler given: the optimizer alone
    losses = []
    for _ in range(60):  # same noise and timesteps every step: a fixed objective
        loss = m_step(m, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_ema_scope_swaps_in_and_back_exactly():
    m = make(ema=EMA(decay=0.5, warmup=False))
    with m.ema_weights() as swapped:
        assert not swapped  # no shadow before fit: the raw weights stay
    m.on_fit_start()  # the shadow starts as a copy of the trainable weights
    raw = {k: p.detach().clone() for k, p in m.unet.named_parameters()}
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(torch.randn_like(p))
    m.ema.update(m.trainable_parameters(), step=1)
    trained = {k: p.detach().clone() for k, p in m.unet.named_parameters()}
    with m.ema_weights() as swapped:
        assert swapped
        for k, p in m.unet.named_parameters():
            torch.testing.assert_close(p, 0.5 * raw[k] + 0.5 * trained[k], msg=k)
    for k, p in m.unet.named_parameters():
        assert torch.equal(p, trained[k]), k  # bit for bit the weights from before the scope
    assert m.ema.shadow.keys() == dict(m.trainable_parameters()).keys()
    assert all(v.dtype == torch.float32 for v in m.ema.shadow.values())


def test_ema_follows_only_trainable_parameters():
    m = make(ema=EMA())
    frozen = "conv_in.weight"
    m.unet.get_parameter(frozen).requires_grad_(False)
    m.on_fit_start()
    assert frozen not in m.ema.shadow and len(m.ema.shadow) == len(dict(m.trainable_parameters()))
    opt = m.configure_optimizers()
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])


def test_bad_options_fail_early(tiny_model: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="prediction_type"):
        load_parts(tiny_model, prediction_type="x0")
    with pytest.raises(ValueError, match="caption_dropout"):
        make(caption_dropout=1.5)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_parts(tmp_path)


def test_unet_from_config_is_fresh(tiny_model: Path):
    pretrained = load_parts(tiny_model)
    scratch = load_parts(tiny_model, unet_config=str(tiny_model / "unet" / "config.json"))
    assert scratch.unet.config.block_out_channels == pretrained.unet.config.block_out_channels
    a, b = pretrained.unet.state_dict(), scratch.unet.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert pretrained.pretrained == str(tiny_model)


def test_skipped_total_and_ema_round_trip_through_the_checkpoint():
    """The count is the run's total (summed over ranks as it is counted), restored as saved."""
    m = make(ema=EMA())
    m.on_fit_start()
    with torch.no_grad():  # an EMA that no longer equals the weights, as after training
        m.ema.update(((n, p + 1.0) for n, p in m.unet.named_parameters()), step=7)
    pixels = torch.zeros(4, 3, 8, 8)
    m.count_skipped({B.PIXELS: pixels, B.SKIPPED: 3})
    m.count_skipped(
        {B.PIXELS: pixels, B.SKIPPED: 2, B.SKIPPED_KINDS: {"decode": 1, "bad_shard": 1}}
    )
    m.nonfinite.total = 4  # optimizer steps skipped for NaN/inf gradients
    ckpt = {"state_dict": {f"unet.{k}": v for k, v in m.unet.state_dict().items()}}
    ckpt["state_dict"]["vae.x"] = torch.zeros(1)
    m.on_save_checkpoint(ckpt)
    assert "vae.x" not in ckpt["state_dict"]  # frozen weights are not saved
    entry = ckpt[checkpoint.ROOT]
    assert entry["version"] == checkpoint.VERSION
    assert entry["skipped_total"] == 5 and type(entry["skipped_total"]) is int
    assert entry["ema"]["shadow"].keys() == dict(m.unet.named_parameters()).keys()
    saved = {k: v.clone() for k, v in entry["ema"]["shadow"].items()}  # as written
    fresh = make(ema=EMA())
    fresh.on_load_checkpoint(ckpt)
    assert int(fresh.skips.total) == 5 and entry["drawn_total"] == int(fresh.skips.drawn) == 13
    assert entry["skipped_nonfinite"] == 4 and fresh.nonfinite.total == 4
    assert entry["skipped_by_kind"] == {"decode": 1, "bad_shard": 1}
    kinds = dict(zip(B.SKIP_KINDS, fresh.skips.by_kind.tolist(), strict=True))
    assert kinds["decode"] == 1 and kinds["bad_shard"] == 1 and sum(kinds.values()) == 2
    # the saved EMA, not the fresh module's weights, once attached as a run resumes (on_fit_start)
    for weights in (dict(m.unet.named_parameters()), dict(fresh.unet.named_parameters())):
        assert all(not torch.equal(saved[k], weights[k]) for k in saved)  # the EMA, told apart
    fresh.on_fit_start()
    assert fresh.ema.shadow.keys() == saved.keys()
    assert all(torch.equal(fresh.ema.shadow[k], v) for k, v in saved.items())
    assert (fresh.ema.num_updates, fresh.ema.last_step) == (1, 7)


def test_fused_adamw_with_grad_clipping_under_bf16_autocast(shards: str, tiny_model: Path):
    """Lightning's AMP plugin refuses to clip with a fused optimizer (a float16-scaler rule); under
    bf16 there is no scaler, so the module clips directly and fused AdamW trains, clipped."""
    import lightning as L

    m = StableDiffusionModule(
        build_parts(32),
        optimizer=partial(torch.optim.AdamW, lr=1e-3, fused=True),
        caption_dropout=0.0,
    )
    import sdtrain.training.optimizer_hooks as hooks

    norms = []
    clip = hooks.clip_with_norm

    def spy(params, max_norm, total):  # the non-finite check's norm, reused
        norms.append((float(total), max_norm))
        return clip(params, max_norm, total)

    dm = WebDataModule(shards, str(tiny_model), resolution=32, batch_size=2, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=2,
        gradient_clip_val=1e-3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    hooks.clip_with_norm = spy
    try:
        trainer.fit(m, datamodule=dm)
    finally:
        hooks.clip_with_norm = clip
    assert trainer.global_step == 2
    assert len(norms) == 2 and all(mx == 1e-3 and n > 1e-3 for n, mx in norms)
    # the last step's gradients stay after fit (zeroed only at a next step's start): every
    # trainable parameter's, clipped from the norms above 1e-3 the spy saw to 1e-3
    params = [p for _, p in m.trainable_parameters()]
    grads = [p.grad for p in params if p.grad is not None]
    assert params and len(grads) == len(params)
    assert float(torch.nn.utils.get_total_norm(grads)) == pytest.approx(1e-3, rel=1e-4)
