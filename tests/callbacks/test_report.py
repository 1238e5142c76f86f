"""TrainingReport: the sample gallery after each round, the curve plot at the end and on SIGTERM."""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from sdtrain.callbacks.report import PANEL_H, PANEL_W, plot_curves, smooth, write_gallery
from sdtrain.cli.train import train
from tests.conftest import compose_cfg, tiny_overrides


def gallery_images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


class Peek(L.Callback):
    """Reads samples/index.html after every optimizer step (runs after the report callback)."""

    pages: list[tuple[int, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        index = Path(trainer.default_root_dir) / "samples" / "index.html"
        Peek.pages.append((trainer.global_step, index.read_text() if index.exists() else ""))


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after optimizer step `step`, as a scheduler preempting it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop after this batch


def sigterm_overrides(model: Path, shards: str, step: int, logger: str) -> list[str]:
    """A tiny run of 1000 steps, no sampling, no checkpoint before the end, that `SigtermAt`
    stops after step `step`."""
    overrides = [o for o in tiny_overrides(model, shards, 1000) if "sample_images" not in o]
    return overrides + [
        f"logger={logger}",
        "~callbacks.sample_images",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
        "+callbacks.stop._target_=tests.callbacks.test_report.SigtermAt",
        f"+callbacks.stop.step={step}",
    ]


def test_gallery_after_each_round_and_curves_at_the_end(
    tiny_model: Path, shards: str, tmp_path: Path
):
    Peek.pages.clear()
    overrides = tiny_overrides(tiny_model, shards, 4) + [
        "logger=none",  # the history comes from the callback, not from a logger
        "callbacks.sample_images.every_n_steps=2",
        "+callbacks.peek._target_=tests.callbacks.test_report.Peek",
    ]
    train(compose_cfg(tmp_path, overrides))
    samples = tmp_path / "samples"
    names = ["step_0000002.png", "step_0000004.png"]
    by_step = dict(Peek.pages)
    assert gallery_images(by_step[2]) == names[:1]  # written right after the first round
    assert gallery_images(by_step[3]) == names[:1]
    page = (samples / "index.html").read_text()
    assert gallery_images(page) == [*names, "../curves.png"]  # every round, then the curves
    assert all((samples / src).is_file() for src in gallery_images(page))  # relative, resolving
    for name in names:  # 4 prompts of a 32 px model: 2 x 2 tiles of >= 128 px
        grid = Image.open(samples / name)
        assert grid.width >= 2 * 128 and grid.height >= 2 * 128
    curves = Image.open(tmp_path / "curves.png")
    assert curves.size == (PANEL_W, 2 * PANEL_H)  # train/loss and train/lr
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (history,) = [s["history"] for k, s in state.items() if k.startswith("TrainingReport")]
    assert [s for s, _ in history["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in history["train/lr"]] == [1, 2, 3, 4]
    assert all(math.isfinite(v) and v > 0 for _, v in history["train/loss"])


def test_a_sigterm_stop_still_plots_the_curves(tiny_model: Path, shards: str, tmp_path: Path):
    overrides = sigterm_overrides(tiny_model, shards, 3, "csv")
    assert train(compose_cfg(tmp_path, overrides)) is None  # stopped by the signal
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert 3 <= ckpt["global_step"] < 1000
    curves = Image.open(tmp_path / "curves.png")
    assert curves.size == (PANEL_W, 2 * PANEL_H)


def test_plot_leaves_out_non_finite_values_and_empty_metrics(tmp_path: Path):
    path = tmp_path / "curves.png"
    assert not plot_curves({"train/loss": [], "train/lr": []}, path)
    assert not path.exists()
    history = {"train/loss": [(1, 0.5), (2, float("nan")), (3, 0.3)], "train/lr": [(1, 1e-4)]}
    assert plot_curves(history, path)
    assert Image.open(path).size == (PANEL_W, 2 * PANEL_H)
    assert plot_curves({"train/loss": [(1, float("inf"))], "other": [(5, 2.0)]}, path)
    assert Image.open(path).size == (PANEL_W, PANEL_H)  # one panel with values


def test_smoothing_is_debiased():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_gallery_orders_rounds_by_step_and_escapes(tmp_path: Path):
    for step in (1000, 20, 300):
        Image.new("RGB", (4, 4)).save(tmp_path / f"step_{step:07d}.png")
    (tmp_path / "notes.png").touch()  # not a round
    page = write_gallery(tmp_path, "<run>").read_text()
    assert gallery_images(page) == [f"step_{s:07d}.png" for s in (20, 300, 1000)]
    assert "&lt;run&gt;" in page and "3 sampling rounds, steps 20 to 1000" in page
