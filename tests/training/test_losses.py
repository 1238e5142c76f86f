"""Loss options against their papers' formulas, and wired into a real training run: pseudo-Huber
losses and their c schedules, input perturbation, zero-terminal-SNR rescaling, timestep sampling."""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler

from sdtrain.cli.train import build_model, check_targets
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.models.loader import load_parts
from sdtrain.training import diffusion
from sdtrain.training.module import StableDiffusionModule
from tests.conftest import compose_cfg

T = 1000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- losses


@pytest.mark.parametrize("kind", ["huber", "smooth_l1"])
def test_pseudo_huber_losses_follow_the_formula(kind: str):
    """Khrapov & Popov 2024: huber 2c(sqrt(d^2 + c^2) - c), smooth_l1 the same over c."""
    pred, target = (
        torch.randn(2, 4, 3, 3, generator=gen()),
        torch.randn(2, 4, 3, 3, generator=gen(1)),
    )
    c = torch.tensor([0.1, 0.7])
    got = diffusion.elementwise_loss(pred, target, kind, c)
    for i, ci in enumerate(c.tolist()):
        for d, g in zip(
            (pred[i] - target[i]).flatten().tolist(), got[i].flatten().tolist(), strict=True
        ):
            root = math.sqrt(d * d + ci * ci) - ci
            assert g == pytest.approx(2 * ci * root if kind == "huber" else 2 * root, rel=1e-5)
    # its two regimes: ~d^2 (huber) or d^2 / c (smooth_l1) below c, ~2c|d| or 2|d| far beyond it
    d = torch.tensor([1e-3, 100.0]).view(2, 1, 1, 1)
    c = torch.tensor([0.1, 0.1])
    near, far = diffusion.elementwise_loss(d, torch.zeros_like(d), kind, c).flatten().tolist()
    scale = 1.0 if kind == "huber" else 1 / 0.1
    assert near == pytest.approx(scale * 1e-6, rel=1e-3)
    assert far == pytest.approx(scale * 2 * 0.1 * (100.0 - 0.1), rel=1e-3)


def test_mse_default_and_weighted_mean():
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    w = torch.tensor([1.0, 0.5, 0.0])
    expected = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    assert torch.allclose(diffusion.diffusion_loss(pred, target, w), expected)
    c = torch.full((3,), 0.2)
    huber = 2 * 0.2 * (((pred - target) ** 2 + 0.04).sqrt() - 0.2)
    got = diffusion.diffusion_loss(pred, target, w, "huber", c)
    assert torch.allclose(got, (huber.mean(dim=(1, 2, 3)) * w).mean())


def test_huber_c_schedules():
    """constant c; exponential exp(-alpha t), alpha = -ln(c) / T; snr (1 - c) / (1 + sigma)^2 + c."""
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    a = sched.alphas_cumprod

    def c_at(schedule):
        return diffusion.huber_c_at(0.1, schedule, t, a, T).tolist()

    assert c_at("constant") == pytest.approx([0.1] * 4)
    alpha = -math.log(0.1) / T
    assert c_at("exponential") == pytest.approx([math.exp(-alpha * s) for s in t.tolist()])
    sigmas = [math.sqrt((1 - a[s].item()) / a[s].item()) for s in t.tolist()]
    assert c_at("snr") == pytest.approx([0.9 / (1 + s) ** 2 + 0.1 for s in sigmas], rel=1e-6)
    zsnr = DDPMScheduler.from_config(sched.config, rescale_betas_zero_snr=True)
    assert diffusion.huber_c_at(0.1, "snr", t, zsnr.alphas_cumprod, T)[-1] == pytest.approx(0.1)


def test_input_perturbation_is_noise_plus_gamma_xi():
    """Ning et al. 2023, eq. 9: inputs from eps + gamma xi; off at gamma 0."""
    noise, xi = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    assert torch.equal(diffusion.perturbed_noise(noise, xi, 0.1), noise + 0.1 * xi)
    assert diffusion.perturbed_noise(noise, xi, 0.0) is noise


# ---------------------------------------------------------------------- timesteps


def test_uniform_timesteps_draw_as_before():
    """The default makes the very call the step made before the options: runs stay comparable."""
    got = diffusion.sample_timesteps(64, T, gen(3), "cpu")
    assert torch.equal(got, torch.randint(0, T, (64,), generator=gen(3)))
    ranged = diffusion.sample_timesteps(4000, T, gen(), "cpu", timestep_range=(200, 300))
    assert ranged.min() == 200 and ranged.max() == 299


def test_logit_normal_timesteps_follow_sd3_density():
    """SD3 (Esser et al. 2024, eq. 19): t = sigmoid(u), u ~ N(m, s), so
    P(t < k / T) = Phi((logit(k / T) - m) / s); checked at several k on 100k draws."""
    m, s = 0.5, 0.8
    t = diffusion.sample_timesteps(100_000, T, gen(), "cpu", "logit_normal", (m, s))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= T - 1
    for k in (50, 250, 500, 750, 950):
        x = k / T
        expected = 0.5 * (1 + math.erf((math.log(x / (1 - x)) - m) / (s * math.sqrt(2))))
        assert (t < k).float().mean().item() == pytest.approx(expected, abs=0.01)
    ranged = diffusion.sample_timesteps(1000, T, gen(), "cpu", "logit_normal", (m, s), (100, 200))
    assert ranged.min() >= 100 and ranged.max() <= 199


@pytest.mark.parametrize(
    "key, value",
    [
        ("loss", "l1"),
        ("huber_schedule", "cosine"),
        ("timestep_sampling", "beta"),
        ("huber_c", 0.0),
        ("input_perturbation", -0.1),
        ("logit_normal", [0.0, 0.0]),
        ("timestep_range", [500, 500]),
        ("timestep_range", [0, 1001]),
        ("timestep_range", [0.5, 10]),
    ],
)
def test_bad_options_name_their_key(key: str, value):
    ok = dict(loss="mse", huber_c=0.1, huber_schedule="snr", input_perturbation=0.0,
              timestep_sampling="uniform", logit_normal=[0.0, 1.0], timestep_range=None)  # fmt: skip
    with pytest.raises(ValueError, match=f"model.{key}="):
        diffusion.check_options(**(ok | {key: value}), num_train_timesteps=T)


# ---------------------------------------------------------------------- zero terminal SNR


def algorithm_1(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, in float64: shift sqrt(alpha_bar) to 0 at T, rescale to keep t=0."""
    ab_sqrt = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = ab_sqrt[0].item(), ab_sqrt[-1].item()
    ab_sqrt = (ab_sqrt - last) * first / (first - last)
    ab = ab_sqrt**2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


@pytest.fixture(scope="module")
def sd_schedule_model(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model (its parts linked) with SD-1.x's own noise schedule: SNR > 0 at t = T - 1.

    (The tiny model's folder is already rescaled to zero terminal SNR.)
    """
    out = tmp_path_factory.mktemp("sd-schedule")
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        (out / sub).symlink_to(tiny_model / sub)
    cfg = DDPMScheduler.load_config(tiny_model / "scheduler")
    plain = DDPMScheduler.from_config(cfg, rescale_betas_zero_snr=False, timestep_spacing="leading")
    plain.save_pretrained(out / "scheduler")
    return out


def test_zero_terminal_snr_rescales_the_loaded_schedule(sd_schedule_model: Path):
    model = sd_schedule_model
    plain = load_parts(model, prediction_type="v_prediction").noise_scheduler
    parts = load_parts(model, prediction_type="v_prediction", zero_terminal_snr=True)
    s = parts.noise_scheduler
    assert s.alphas_cumprod[-1] == 0 and plain.alphas_cumprod[-1] > 0
    betas = algorithm_1(plain.betas)  # diffusers divides in fp32: betas agree to ~1e-7 absolute
    assert torch.allclose(s.betas.double(), betas, rtol=1e-4, atol=5e-7)
    assert torch.allclose(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6)
    assert s.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-5)
    # the samplers built from it start from pure noise (trailing spacing) on the rescaled betas
    from sdtrain.artifacts.sampling import build_pipeline

    p = parts
    for sampler in ("ddim", "euler", "dpm++"):
        pipe = build_pipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, s, sampler)
        pipe.scheduler.set_timesteps(4)
        assert pipe.scheduler.timesteps[0] == T - 1, sampler
    assert pipe.scheduler.config.rescale_betas_zero_snr
    with pytest.raises(ValueError, match="model.zero_terminal_snr=true needs .*v_prediction"):
        load_parts(model, prediction_type="epsilon", zero_terminal_snr=True)


def test_config_keys_reach_the_module(sd_schedule_model: Path, tmp_path: Path):
    opts = ["model.loss=smooth_l1", "model.input_perturbation=0.1", "model.zero_terminal_snr=true",
            "model.prediction_type=v_prediction", "model.timestep_sampling=logit_normal",
            "model.timestep_range=[0,500]", f"model.pretrained={sd_schedule_model}"]  # fmt: skip
    cfg = compose_cfg(tmp_path, opts)
    check_targets(cfg)
    m = build_model(cfg.model)
    h = m.hparams
    assert (h.loss, h.input_perturbation, h.timestep_sampling) == ("smooth_l1", 0.1, "logit_normal")
    assert list(h.timestep_range) == [0, 500] and m.noise_scheduler.alphas_cumprod[-1] == 0


# ---------------------------------------------------------------------- a real run


class Spy(StableDiffusionModule):
    """Keeps what each training step drew, fed the U-Net, and returned."""

    def on_train_start(self) -> None:
        self.steps: list[dict] = []

    def latents_and_context(self, batch, g):
        latents, context, d = super().latents_and_context(batch, g)
        self.steps.append({"latents": latents, **d})
        return latents, context, d

    def forward(self, noisy, timesteps, context):
        pred = super().forward(noisy, timesteps, context)
        self.steps[-1].update(noisy=noisy.detach(), pred=pred.detach())
        return pred

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.steps[-1]["loss"] = loss.detach()
        return loss


def fit(model: Path, shards: str, zero_snr: bool, **options) -> Spy:
    parts = load_parts(model, prediction_type="v_prediction", zero_terminal_snr=zero_snr)
    m = Spy(parts, optimizer=partial(torch.optim.AdamW, lr=1e-3), caption_dropout=0.0, **options)
    dm = WebDataModule(shards, str(model), resolution=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(m, datamodule=dm)
    return m


def test_all_options_are_wired_into_a_training_run(sd_schedule_model: Path, shards: str):
    options = dict(loss="huber", huber_c=0.2, huber_schedule="snr", input_perturbation=0.1,
                   timestep_sampling="logit_normal", logit_normal=(0.5, 1.0),
                   timestep_range=(100, 1000))  # fmt: skip
    m = fit(sd_schedule_model, shards, True, **options)
    base = fit(sd_schedule_model, shards, False)
    a = m.noise_scheduler.alphas_cumprod.double()
    assert a[-1] == 0 and base.noise_scheduler.alphas_cumprod[-1] > 0
    for step, plain in zip(m.steps, base.steps, strict=True):
        t = step["t"]
        assert t.min() >= 100 and torch.isfinite(step["loss"])
        assert not torch.equal(t, plain["t"]) and step["loss"] != plain["loss"]
        # the inputs were noised with noise + 0.1 xi on the rescaled schedule ...
        at = a[t].view(-1, 1, 1, 1)
        x0, eps = step["latents"].double(), step["noise"].double()
        inputs = at.sqrt() * x0 + (1 - at).sqrt() * (eps + 0.1 * step["perturb"].double())
        assert torch.allclose(step["noisy"].double(), inputs, atol=1e-5)
        # ... and the loss is the pseudo-Huber one against the v target of the unperturbed noise
        v = at.sqrt() * eps - (1 - at).sqrt() * x0
        sigma = ((1 - a[t]) / a[t]).sqrt()
        c = ((1 - 0.2) / (1 + sigma) ** 2 + 0.2).view(-1, 1, 1, 1)
        d = step["pred"].double() - v
        expected = (2 * c * ((d**2 + c**2).sqrt() - c)).mean()
        assert step["loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_readme_table_names_real_keys(tmp_path: Path):
    """Every `model.` / `data.` key the README's "Loss options and captions" table names exists."""
    from omegaconf import OmegaConf

    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text().split("### Loss options and captions")[1]
    rows = [line for line in text.split("\n\n")[2].splitlines() if line.startswith("| `")]
    keys = [k for row in rows for k in re.findall(r"`((?:model|data)\.\w+)`", row.split("|")[1])]
    assert len(keys) >= 15
    cfg = compose_cfg(tmp_path)
    missing = [k for k in keys if OmegaConf.select(cfg, k, default="missing") == "missing"]
    assert not missing


def test_a_zero_terminal_snr_run_exports_its_schedule(
    sd_schedule_model: Path, shards: str, tmp_path: Path
):
    """The checkpoint records the rescale, so the exported folder (and sampling from the
    checkpoint) use the schedule the run trained on, not the folder's plain one."""
    from diffusers import StableDiffusionPipeline

    from sdtrain.artifacts import checkpoint
    from sdtrain.artifacts.export import checkpoint_parts, export

    parts = load_parts(sd_schedule_model, prediction_type="v_prediction", zero_terminal_snr=True)
    m = StableDiffusionModule(parts, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    dm = WebDataModule(shards, str(sd_schedule_model), resolution=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(m, datamodule=dm)
    ckpt = tmp_path / "zts.ckpt"
    trainer.save_checkpoint(ckpt)
    assert checkpoint.run_info(checkpoint.load(ckpt))["zero_terminal_snr"] is True
    assert checkpoint_parts(ckpt, ema=False).noise_scheduler.alphas_cumprod[-1] == 0
    pipe = StableDiffusionPipeline.from_pretrained(export(ckpt, tmp_path / "out", ema=False))
    s = pipe.scheduler
    assert s.config.rescale_betas_zero_snr and s.config.prediction_type == "v_prediction"
    s.set_timesteps(4)
    assert s.timesteps[0] == T - 1 and s.alphas_cumprod[-1] == 0
