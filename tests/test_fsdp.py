"""trainer=fsdp with 2 real CPU processes (gloo): the U-Net sharded with FSDP2, the EMA kept per
shard, checkpoints gathered into one file that resumes exactly (EMA resharded) and exports to a
diffusers folder."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sdtrain.cli.export import main as export_main
from tests.conftest import tiny_overrides
from tests.ranks_helpers import assert_weights_close, load_start
from tests.test_resume_parity import assert_same
from tests.test_train import _cli


def two_rank_args(
    strategy: str,
    tiny_model: Path,
    shards: str,
    steps: int,
    *extra: str,
    every: int = 2,
    precision: str | None = "32-true",
) -> list[str]:
    """`steps` steps of the tiny model on 2 CPU processes (gloo) under trainer=STRATEGY, in fp32
    (`precision` None: the precision trainer=STRATEGY ships), saving every `every` steps."""
    return tiny_overrides(tiny_model, shards, steps) + [
        f"trainer={strategy}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        *([f"trainer.precision={precision}"] if precision else []),
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "data.resampled=false",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        *extra,
    ]


def run_two_ranks(strategy: str, folder: Path, tiny_model: Path, shards: str, *extra: str) -> None:
    """4 steps of the tiny model on 2 CPU processes under trainer=STRATEGY, in fp32."""
    args = two_rank_args(strategy, tiny_model, shards, 4, f"hydra.run.dir={folder}", *extra)
    proc = _cli(args, folder.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def straight(tiny_model: Path, shards: str, tmp_path_factory) -> Path:
    """An FSDP run of 4 steps from the start."""
    folder = tmp_path_factory.mktemp("fsdp") / "straight"
    run_two_ranks("fsdp", folder, tiny_model, shards)
    return folder


def load(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow  # ~48 s with its 2-rank fixture run; CI runs it
def test_fsdp_trains_saves_whole_weights_resumes_exactly_and_exports(
    straight: Path, tiny_model: Path, shards: str, tmp_path: Path
):
    resumed = tmp_path / "resumed"
    assert "FSDP: U-Net sharded over 2 ranks" in (straight / "train.log").read_text()
    assert (straight / "samples" / "step_0000004.png").is_file()  # sampling ran on both ranks
    step2 = straight / "checkpoints" / "step_0000002.ckpt"
    run_two_ranks("fsdp", resumed, tiny_model, shards, f"ckpt_path={step2}")

    a, b = load(straight), load(resumed)
    assert a["global_step"] == b["global_step"] == 4
    shadow = a["sdtrain"]["ema"]["shadow"]
    weights = {k[len("unet.") :]: v for k, v in a["state_dict"].items()}
    assert shadow.keys() == weights.keys()  # whole tensors, not shards
    assert all(shadow[k].shape == weights[k].shape for k in shadow)
    assert a["sdtrain"]["ema"]["num_updates"] == 4
    assert any(not torch.equal(shadow[k], weights[k]) for k in shadow)
    for key in ("state_dict", "sdtrain"):  # resumed from step 2: the same weights and EMA
        assert_same(a[key], b[key], key)

    export_main([str(straight / "checkpoints" / "last.ckpt"), str(tmp_path / "export")])
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet")
    assert torch.equal(unet.state_dict()["conv_in.weight"], shadow["conv_in.weight"])


@pytest.mark.slow  # ~16 s more (a DDP run); CI runs it
def test_fsdp_trains_like_ddp(straight: Path, tiny_model: Path, shards: str, tmp_path: Path):
    """The same 2 ranks, seed and data under DDP: the same weights and EMA after 4 steps (fp32;
    only the order of the gradient sums differs). Catches a shard-local gradient clip, a
    gradient sum not averaged over ranks, or an optimizer or EMA step that sees one shard wrong."""
    ddp = tmp_path / "ddp"
    run_two_ranks("ddp", ddp, tiny_model, shards)
    a, b = load(straight), load(ddp)
    assert a["global_step"] == b["global_step"] == 4
    start = load_start(tiny_model)
    moved = assert_weights_close(a["state_dict"], b["state_dict"], start)
    assert moved > len(start) // 2  # the steps changed the weights: the match is not trivial
    ema_a, ema_b = (c["sdtrain"]["ema"]["shadow"] for c in (a, b))
    for key in ema_b:
        torch.testing.assert_close(ema_a[key], ema_b[key], rtol=1e-4, atol=2e-6)


class ClipProbe(L.Callback):
    """Each step's global gradient norm (all ranks' shards together) before the clip and after it
    (read once the optimizer has stepped: the update leaves the clipped gradients as they are),
    with the precision plugin and clip value the run trained under; written by rank 0 as JSON to
    `out` when training ends."""

    def __init__(self, out: str) -> None:
        self.out, self.steps, self.before = out, [], None

    @staticmethod
    def norm(pl_module) -> tuple[float, int]:
        """(the 2-norm of all the trainable gradients, how many parameters have one)."""
        import torch.distributed as dist

        from sdtrain.training.sharding import local

        squares, n = torch.zeros((), dtype=torch.float64), 0
        for _, p in pl_module.trainable_parameters():
            if p.grad is not None:  # a DTensor shard: this rank's part of the gradient
                squares += local(p.grad).double().pow(2).sum()
                n += 1
        dist.all_reduce(squares)  # the shards partition each gradient: squares add up
        return float(squares.sqrt()), n

    def on_train_start(self, trainer, pl_module):
        plugin = trainer.precision_plugin
        self.setup = {
            "precision": trainer.precision,
            "plugin": type(plugin).__name__,
            "scaler": getattr(plugin, "scaler", None) is not None,
            "gradient_clip_val": trainer.gradient_clip_val,
            "strategy": type(trainer.strategy).__name__,
            "sharded": all(hasattr(p, "device_mesh") for _, p in pl_module.trainable_parameters()),
        }

        def after_step(optimizer, args, kwargs):  # the clip ran inside the step, before the update
            (before, n_before), (after, n_after) = self.before, self.norm(pl_module)
            self.steps.append({"before": before, "after": after, "n": [n_before, n_after]})

        trainer.optimizers[0].register_step_post_hook(after_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = self.norm(pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            import json

            Path(self.out).write_text(json.dumps({"setup": self.setup, "steps": self.steps}))


@pytest.mark.slow  # ~20 s: 2 FSDP processes in bf16-mixed
def test_fsdp_clips_the_global_norm_under_bf16_mixed_as_shipped(
    tiny_model: Path, shards: str, tmp_path: Path
):
    """trainer=fsdp as shipped (bf16-mixed, gradient_clip_val 1.0; the tests above run fp32): bf16
    autocast has no loss scaler, so the module clips the sharded gradients itself
    (`configure_gradient_clipping`'s direct path, not Lightning's), and the norm it clips is the
    whole gradient's over both ranks: after the clip it is exactly gradient_clip_val. A shard-local
    norm would leave the global one near sqrt(2) times it; a skipped clip, the norm before."""
    from tests.conftest import compose_cfg

    shipped = compose_cfg(tmp_path / "cfg", ["trainer=fsdp"]).trainer
    assert (shipped.precision, shipped.gradient_clip_val) == ("bf16-mixed", 1.0)
    run, out = tmp_path / "run", tmp_path / "clip.json"
    probe = [
        "+callbacks.clip_probe._target_=tests.test_fsdp.ClipProbe",
        f"+callbacks.clip_probe.out={out}",
    ]
    args = two_rank_args(
        "fsdp", tiny_model, shards, 2, f"hydra.run.dir={run}", *probe, precision=None, every=2
    )
    proc = _cli(args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    got = json.loads(out.read_text())
    assert got["setup"] == {
        "precision": "bf16-mixed",
        "plugin": "MixedPrecision",  # autocast, no GradScaler: the module's own clip
        "scaler": False,
        "gradient_clip_val": 1.0,
        "strategy": "FSDPStrategy",
        "sharded": True,
    }
    steps = got["steps"]
    assert len(steps) == 2
    for step in steps:
        assert step["n"][0] == step["n"][1] > 0  # every trainable parameter has its gradient
        assert step["before"] > 1.5  # the clip has work to do: the norm is well above 1.0
        assert step["after"] == pytest.approx(1.0, rel=1e-4)  # the global norm, clipped to it


# ~44 s on a 2-core CPU (two more 2-process runs and a DDP refusal). The gathered-checkpoint test
# above covers FSDP's training, exact resume and export in the default suite; the sharded folders'
# atomic swap is tested without processes in tests/callbacks/test_checkpoint.py.
@pytest.mark.slow
def test_sharded_checkpoints_keep_the_ema_in_shards_resume_exactly_and_export(
    straight: Path, tiny_model: Path, shards: str, tmp_path: Path
):
    """save_distributed_checkpoint=true: a folder per checkpoint (one file per rank + meta.pt)
    holding the EMA as shards (no gathered copy anywhere), the same training as the gathered
    files, an exact resume from it, and exports and loads without any processes."""
    from sdtrain.artifacts import checkpoint as C

    sharded = ["trainer.strategy.save_distributed_checkpoint=true"]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run_two_ranks("fsdp", first, tiny_model, shards, *sharded)
    last = first / "checkpoints" / "last.ckpt"
    assert C.is_sharded(last) and len(list(last.glob("*.distcp"))) == 2
    meta = torch.load(last / C.SHARDED_META, map_location="cpu", weights_only=True)
    assert meta["sdtrain"]["ema"]["shadow"] is None and meta["sdtrain"]["ema"]["sharded"]
    # saved at step 2, then replaced whole at step 4 (written beside it, renamed onto it)
    assert meta["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == [
        "last.ckpt",
        "step_0000002.ckpt",
        "step_0000004.ckpt",
    ]
    gathered = load(straight)
    assert C.sharded_keys(last, C.SHARDED_EMA) == set(gathered["sdtrain"]["ema"]["shadow"])

    got = C.load(last)  # put together in this one process
    for key in ("state_dict", "sdtrain"):  # the same training as the gathered run's
        assert_same(got[key], gathered[key], key)

    step2 = first / "checkpoints" / "step_0000002.ckpt"
    run_two_ranks("fsdp", resumed, tiny_model, shards, *sharded, f"ckpt_path={step2}")
    again = C.load(resumed / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "sdtrain"):
        assert_same(again[key], gathered[key], key)

    export_main([str(last), str(tmp_path / "export")])
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet")
    shadow = gathered["sdtrain"]["ema"]["shadow"]
    assert torch.equal(unet.state_dict()["conv_in.weight"], shadow["conv_in.weight"])

    # only FSDP reads its optimizer layout: DDP refuses it by name before any model loads
    args = tiny_overrides(tiny_model, shards, 6) + ["trainer=ddp", "trainer.precision=32-true"]
    proc = _cli([*args, f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path)
    assert proc.returncode != 0
    assert f"{last} is a sharded checkpoint" in proc.stderr and "trainer=fsdp" in proc.stderr


@pytest.mark.slow
def test_sigkill_mid_sharded_save_leaves_whole_checkpoints_and_last_resumes(
    tiny_model: Path, shards: str, tmp_path: Path
):
    """Both ranks SIGKILLed while they write a sharded checkpoint (saves every step): every
    checkpoint folder left is whole, and `ckpt_path=last` resumes from it. Before, the shards were
    written into `last.ckpt` itself: a kill left it part old, part new."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sdtrain.artifacts import checkpoint as C
    from tests.conftest import ROOT

    run = tmp_path / "run"
    folder = run / "checkpoints"
    sharded = ["trainer.strategy.save_distributed_checkpoint=true", f"hydra.run.dir={run}"]
    args = two_rank_args("fsdp", tiny_model, shards, 100000, *sharded, every=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdtrain.cli.train", *args],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # both ranks in one process group: one kill takes both
        )
    end = time.monotonic() + 240
    try:

        def under_way() -> bool:  # a save's folder, or (saved in place) one without its meta.pt
            return bool(list(folder.glob(".*.tmp-*"))) or any(
                not (p / C.SHARDED_META).exists() for p in folder.glob("*.ckpt")
            )

        while not ((folder / "last.ckpt").is_dir() and under_way()):
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < end, "no sharded save seen under way"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    step = C.load(folder / "last.ckpt")["global_step"]  # whole: put together in one process
    for ckpt in folder.glob("*.ckpt"):
        assert C.load(ckpt)["global_step"] >= 1

    args = two_rank_args("fsdp", tiny_model, shards, step + 2, *sharded, "ckpt_path=last", every=1)
    resumed = _cli(args, tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert C.load(folder / "last.ckpt")["global_step"] == step + 2
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # leftovers gone


@pytest.mark.slow  # two 2-rank runs, ~2 min
def test_fsdp_accumulation_reduces_once_per_optimizer_step(
    tiny_model: Path, shards: str, tmp_path: Path
):
    """At accumulate_grad_batches=3, the gradients are reduce-scattered on the window's last
    micro-batch only (issue 26 item 5; on the code before, every micro-batch reduced: 3x the
    traffic). The summed gradients train as DDP's do: the same weights after 2 steps."""
    import json

    counts = tmp_path / "counts"
    args = two_rank_args(
        "fsdp",
        tiny_model,
        shards,
        2,
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.accumulate_grad_batches=3",
        "+callbacks.count._target_=tests.ranks_helpers.CountReductions",
        f"+callbacks.count.out={counts}",
        every=2,
    )
    proc = _cli(args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        rows = json.loads((counts / f"rank{rank}.json").read_text())
        calls = [c for _, c in rows]
        assert len(calls) == 6, rows  # 2 steps x 3 micro-batches
        assert calls[0] == calls[1] == calls[3] == calls[4] == 0, rows  # inside a window
        assert calls[2] > 0 and calls[5] == calls[2], rows  # each window's last: every unit once
    ddp = tmp_path / "ddp"  # the same windows under DDP (no_sync): the same weights
    ddp_args = two_rank_args(
        "ddp", tiny_model, shards, 2, f"hydra.run.dir={ddp}", "trainer.accumulate_grad_batches=3"
    )
    proc = _cli(ddp_args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = load(tmp_path / "run")["state_dict"], load(ddp)["state_dict"]
    assert assert_weights_close(a, b, load_start(tiny_model)) > 0
