"""The run's report: an HTML gallery of every sampling round and a loss/LR curve PNG.

- `samples/index.html` (beside the grids the sampling callback writes): every round's grid side by
  side, oldest first, rewritten after each round; image paths are relative, so the run folder can
  be moved, copied or served as it is.
- `curves.png` (the run folder): `train/loss` (raw and smoothed) and `train/lr` against the
  optimizer step, drawn at the end of training and when a run stops by an exception (a
  preemption signal, a crash, Ctrl-C). The values are those the module logs, read from
  `trainer.callback_metrics` after every optimizer step, so it works with any logger or none; the
  history is kept in checkpoints, so a resumed run's plot covers the whole run.
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
from pathlib import Path

import lightning as L
import torch
from PIL import Image, ImageDraw

from sdtrain.artifacts.sampling import font
from sdtrain.callbacks.sampling import SampleImages

log = logging.getLogger(__name__)

GRID_NAME = re.compile(r"step_(\d+)\.png")  # what SampleImages writes
FLUSH_EVERY = 100  # steps of values kept as tensors before one host sync turns them into floats


class TrainingReport(L.Callback):
    """Keeps the logged metrics' history; writes the sample gallery and the curve plot (rank 0).

    Args:
        metrics: logged metric names to plot, one panel each (absent ones are left out).
        plot_path: the curve PNG (None: `<trainer.default_root_dir>/curves.png`).
        gallery: write `index.html` beside the sampling callback's grids.
        smoothing: weight of the past in the smoothed loss line (0: none; 0.9 ≈ 10-step mean).
    """

    def __init__(
        self,
        metrics: list[str] | tuple[str, ...] = ("train/loss", "train/lr"),
        plot_path: str | None = None,
        gallery: bool = True,
        smoothing: float = 0.9,
    ) -> None:
        if not 0 <= smoothing < 1:
            raise ValueError(f"callbacks.report.smoothing={smoothing} is not in [0, 1)")
        self.metrics = list(metrics)
        self.plot_path = plot_path
        self.gallery = gallery
        self.smoothing = smoothing
        self.history: dict[str, list[tuple[int, float]]] = {m: [] for m in self.metrics}
        self._pending: list[tuple[int, str, torch.Tensor]] = []
        self._last_step: int | None = None
        self._rounds = 0  # sampling rounds the gallery shows

    # ------------------------------------------------------------------ hooks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps; unchanged while gradients accumulate
        if step != self._last_step:
            self._last_step = step
            self.record(trainer.callback_metrics, step)
        if self.gallery and trainer.is_global_zero and self._new_rounds(trainer):
            self.write_gallery(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:  # after every callback's on_train_end
        self.finish(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.finish(trainer)

    def state_dict(self) -> dict:
        self._flush()
        return {"history": {m: [list(p) for p in v] for m, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        for m, points in state.get("history", {}).items():
            self.history[m] = [(int(s), float(v)) for s, v in points]

    # ------------------------------------------------------------------ work

    def record(self, metrics: dict, step: int) -> None:
        """Keep this step's value of each plotted metric (as tensors: no host sync per step)."""
        for name in self.metrics:
            value = metrics.get(name)
            if value is not None:
                self._pending.append((step, name, torch.as_tensor(value).detach()))
        if len(self._pending) >= FLUSH_EVERY * len(self.metrics):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        device = self._pending[0][2].device  # one copy to the host for all of them
        values = torch.stack([v.float().reshape(()).to(device) for _, _, v in self._pending])
        values = values.tolist()
        for (step, name, _), value in zip(self._pending, values, strict=True):
            self.history.setdefault(name, []).append((step, value))
        self._pending.clear()

    def finish(self, trainer: L.Trainer) -> None:
        """The plot, then the gallery (which links it); rank 0 only. Never raises: a report
        must not turn a finished run, or a preempted one saving its checkpoint, into a crash."""
        if not trainer.is_global_zero:
            return
        try:
            self._flush()
            path = self.plot_file(trainer)
            if plot_curves(self.history, path, self.smoothing):
                log.info("loss and LR curves -> %s", path)
            if self.gallery:
                self.write_gallery(trainer)
        except Exception:
            log.exception("the run report (curves.png, samples/index.html) failed")

    def _new_rounds(self, trainer: L.Trainer) -> bool:
        rounds = sum(len(cb.saved) for cb in sampling_callbacks(trainer))
        new, self._rounds = rounds != self._rounds, rounds
        return new

    def plot_file(self, trainer: L.Trainer) -> Path:
        return Path(self.plot_path or Path(trainer.default_root_dir) / "curves.png")

    def write_gallery(self, trainer: L.Trainer) -> None:
        """index.html in each sampling callback's folder (normally just `samples/`)."""
        for cb in sampling_callbacks(trainer):
            folder = cb.folder(trainer)
            if folder.is_dir():
                write_gallery(folder, Path(trainer.default_root_dir).name, self.plot_file(trainer))


def sampling_callbacks(trainer: L.Trainer) -> list[SampleImages]:
    return [cb for cb in trainer.callbacks if isinstance(cb, SampleImages)]


# ---------------------------------------------------------------- the gallery


def write_gallery(folder: Path, title: str, plot: Path | None = None) -> Path:
    """`folder/index.html`: every `step_N.png` grid in `folder`, by step, side by side."""
    rounds = sorted(
        (int(m.group(1)), p.name) for p in folder.iterdir() if (m := GRID_NAME.fullmatch(p.name))
    )
    figures = "\n".join(
        f'<figure><img src="{html.escape(name)}" alt="step {step}">'
        f"<figcaption>step {step}</figcaption></figure>"
        for step, name in rounds
    )
    span = f", steps {rounds[0][0]} to {rounds[-1][0]}" if rounds else ""
    curves = ""
    if plot is not None and plot.is_file():
        rel = Path(os.path.relpath(plot, folder)).as_posix()
        curves = f'<h2>Training curves</h2>\n<img src="{html.escape(rel)}" alt="loss and LR">'
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}: samples</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.rounds {{ display: flex; gap: 1em; overflow-x: auto; align-items: flex-start; }}
figure {{ margin: 0; flex: none; }}
figcaption {{ text-align: center; font-weight: bold; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{len(rounds)} sampling rounds{span}; oldest first (scroll sideways).</p>
<div class="rounds">
{figures}
</div>
{curves}
</body></html>
"""
    path = folder / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(path)  # a browser reloading mid-write never sees half a page
    return path


# ---------------------------------------------------------------- the curve plot

PANEL_W, PANEL_H = 640, 220
LIGHT, DARK = (170, 190, 230), (20, 60, 160)
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 16, 24, 28


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else v)
    return out


def plot_curves(
    history: dict[str, list[tuple[int, float]]], path: Path, smoothing: float = 0.9
) -> bool:
    """One panel per metric with finite values (step on x); False (nothing written) if none."""
    series = {}
    for name, points in history.items():
        pts = [(s, v) for s, v in points if math.isfinite(v)]
        if pts:
            series[name] = pts
    if not series:
        return False
    canvas = Image.new("RGB", (PANEL_W, PANEL_H * len(series)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, pts) in enumerate(series.items()):
        values = [v for _, v in pts]
        if name.endswith("loss") and smoothing and len(pts) > 1:  # raw pale, smoothed on top
            lines = [(values, LIGHT), (smooth(values, smoothing), DARK)]
        else:
            lines = [(values, DARK)]
        panel(draw, i * PANEL_H, name, [s for s, _ in pts], lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return True


def panel(draw: ImageDraw.ImageDraw, top: int, name: str, steps: list[int], lines) -> None:
    """Axes, tick labels and polylines for one metric, in the band starting at `top`."""
    x0, x1 = MARGIN_L, PANEL_W - MARGIN_R
    y0, y1 = top + MARGIN_T, top + PANEL_H - MARGIN_B
    lo, hi = min(min(v) for v, _ in lines), max(max(v) for v, _ in lines)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    s_lo, s_hi = steps[0], max(steps[-1], steps[0] + 1)

    def xy(s: int, v: float) -> tuple[float, float]:
        return x0 + (s - s_lo) / (s_hi - s_lo) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0)

    fnt = font()
    draw.rectangle((x0, y0, x1, y1), outline="black")
    draw.text((x0, top + 4), f"{name} (last {lines[0][0][-1]:.4g})", fill="black", font=fnt)
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        y = y1 - frac * (y1 - y0)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((4, y - 7), f"{v:.3g}", fill="black", font=fnt)
        s = round(s_lo + frac * (s_hi - s_lo))
        x = xy(s, lo)[0]
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text((x - 3 * len(str(s)), y1 + 6), str(s), fill="black", font=fnt)
    draw.text((4, y1 + 6), "step", fill="black", font=fnt)
    for values, colour in lines:
        points = [xy(s, v) for s, v in zip(steps, values, strict=True)]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        else:
            draw.line(points, fill=colour, width=2)
