"""Quiet by default: a real run prints none of the messages no user can act on; verbose=true
shows them again; actionable warnings stay; first-run set-up says what it makes and how far."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from sdtrain.runtime import quiet
from tests.conftest import tiny_overrides
from tests.test_train import _cli

# What a default run printed before sdtrain/runtime/quiet.py (CPU, W&B offline, Lightning 2.6,
# transformers 5, wandb 0.31), one substring each.
SILENCED = (
    "Seed set to",  # Lightning
    "GPU available:",
    "TPU available:",
    "💡 Tip",  # Lightning's litlogger advertisement
    "LeafSpec",  # torch's pytree deprecation, inside Lightning
    "module(s) in eval mode",  # the frozen VAE and text encoder, on purpose
    "requires torchvision",  # transformers' image-processor fallback
    "`Trainer.fit` stopped",
    "Loading weights",  # transformers' progress bar
    "anonymous setting has no effect",  # W&B, for Lightning's anonymous=None
    "Tracking run with wandb version",  # W&B's header and footer
    "Run history:",
    "W&B syncing is set to",  # W&B's three offline lines, whatever WANDB_QUIET says
    "Run data is saved locally in",
    "wandb leet",
    "no peak FLOP/s known for device cpu",
    "FLOPs per image",  # sdtrain's own, said only where it gives an MFU (not on a CPU)
    "Epoch 0",  # Lightning's bar: "Epoch 0/-2" in a run of max_steps
    "v_num",
)


def run_cli(args: list[str], cwd: Path) -> str:
    """stdout + stderr of `sdtrain-train args`, W&B's own output not silenced by the env."""
    # conftest silences W&B; here its output is under test
    proc = _cli(args, cwd, unset=("WANDB_SILENT",))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def quiet_and_verbose(tiny_model: Path, shards: str, tmp_path_factory) -> tuple[str, str]:
    """One short real run (default logger: W&B offline; no held-out data) quiet, with the
    progress bar and Hydra's dated run folder under `quiet/outputs/`, and the same with
    verbose=true."""
    tmp = tmp_path_factory.mktemp("quiet")
    args = [a for a in tiny_overrides(tiny_model, shards, 2) if "enable_progress_bar" not in a]
    (tmp / "quiet").mkdir()
    quiet = run_cli([*args, "trainer.enable_progress_bar=true"], tmp / "quiet")
    verbose = run_cli(
        [*args, "trainer.enable_progress_bar=false", "verbose=true", f"hydra.run.dir={tmp / 'v'}"],
        tmp,
    )
    return quiet, verbose


def test_a_quiet_run_prints_none_of_the_silenced_messages(quiet_and_verbose):
    out, _ = quiet_and_verbose
    assert [s for s in SILENCED if s in out] == []
    assert "finished at step 2/2" in out  # the run still reports itself
    assert "wandb sync " in out  # and how to upload its offline W&B run
    (bar,) = [line for line in out.splitlines() if " 2/2 " in line]
    assert bar.startswith("step ") and "train/loss" in bar  # the bar counts optimizer steps


def test_a_run_without_held_out_data_ends_with_one_line_about_val_loss_ema(quiet_and_verbose):
    out, _ = quiet_and_verbose
    about = [line for line in out.splitlines() if "val/loss_ema" in line]
    assert len(about) == 1, about
    assert about[0].endswith(
        "no held-out data: val/loss_ema not logged; add data.val_shards=<shards> or "
        "data.val_split_shards=1 to rank runs by it (returning train/loss)"
    )
    assert "metrics logged" not in out  # before: the run's eleven metric names


def test_latest_finds_the_newest_run(quiet_and_verbose):
    out, _ = quiet_and_verbose
    (start,) = [line for line in out.splitlines() if "training from step 0 to 2 in " in line]
    folder = Path(start.split(" in ", 1)[1])  # the run says where it is
    runs = folder.parent
    assert runs.name == "runs" and sorted(p.name for p in runs.iterdir()) == [folder.name, "latest"]
    assert (runs / "latest").is_symlink() and (runs / "latest").resolve() == folder.resolve()
    assert (runs / "latest" / "checkpoints" / "last.ckpt").is_file()


def test_verbose_shows_them_again(quiet_and_verbose):
    _, out = quiet_and_verbose
    shown = [s for s in SILENCED if s in out]
    assert "Seed set to" in shown and "GPU available:" in shown and len(shown) >= 5, shown


def warn(message: str, category: type[Warning]) -> None:
    warnings.warn(message, category, stacklevel=2)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_named_messages_are_silenced():
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records, level = Records(), lightning_log.level
    try:
        quiet.apply(verbose=False)
        lightning_log.addHandler(records)
        lightning_log.setLevel(logging.INFO)
        lightning_log.info("GPU available: True (cuda), used: True")
        lightning_log.warning("GPU available but not used. You can set it by doing ...")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet.apply(verbose=False)  # catch_warnings reset the filters; apply again
            warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warn("Checkpoint directory /x exists and is not empty.", UserWarning)
            warn("something else is deprecated", FutureWarning)
            quiet.apply(verbose=False, resuming=True)
            warn("Checkpoint directory /x exists and is not empty.", UserWarning)
            quiet.apply(verbose=True)
            warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        lightning_log.info("GPU available: False, used: False")
    finally:
        lightning_log.removeHandler(records)
        lightning_log.setLevel(level)
        quiet.restore()
    assert records.messages == [
        "GPU available but not used. You can set it by doing ...",  # actionable: stays
        "GPU available: False, used: False",  # verbose
    ]
    assert [str(w.message) for w in caught] == [
        "Checkpoint directory /x exists and is not empty.",  # a new run in a used folder
        "something else is deprecated",
        "`isinstance(treespec, LeafSpec)` is deprecated, use ...",  # verbose
    ]


def test_first_run_setup_says_what_it_makes_and_how_far(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from sdtrain.demo.resolvers import demo_shards
    from sdtrain.demo.tiny import build_vae, fit_vae

    caplog.set_level(logging.INFO)
    demo_shards(str(tmp_path / "shards"), 32, 300)
    fit_vae(build_vae(32), 32, steps=20, batch_size=2)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("sdtrain.")]
    assert lines[0].startswith("first run: making the demo data (300 captioned images in 4 shards)")
    assert lines[1:3] == ["demo images: 100/300 (33%)", "demo images: 200/300 (66%)"]
    assert lines[3].startswith("made the demo data (300 captioned images in 4 shards) in ")
    vae = [m.split(",")[0] for m in lines[4:]]
    assert vae == [f"VAE fit: step {s}/20 ({5 * s}%)" for s in range(2, 21, 2)]  # every 10%
