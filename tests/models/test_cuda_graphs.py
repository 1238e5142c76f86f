"""`model.cuda_graphs` (sdtrain.models.cuda_graphs): the compiled U-Net goes through Inductor with
CUDA graphs on; where graphs cannot be used the run says why in one line and trains with ordinary
launches. The CUDA test records and replays real graphs in a real training run."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from sdtrain.demo.tiny import build_unet
from sdtrain.models import cuda_graphs, speed
from tests.conftest import compose_cfg, tiny_overrides


class Hparams(dict):
    __getattr__ = dict.__getitem__


def _hparams(**over) -> Hparams:
    h = dict(channels_last=False, attention=None, fuse_projections=False, fp8=None,
             compile="unet", drop_layout_copies=True, cuda_graphs=True)  # fmt: skip
    h.update(over)
    return Hparams(h)


@pytest.fixture
def compiled(monkeypatch):
    """The options each `nn.Module.compile` call gets (nothing is compiled)."""
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append(kw))
    return calls


def test_needs_compile_and_a_boolean():
    with pytest.raises(ValueError, match="model.cuda_graphs=true needs model.compile"):
        speed.check(None, cuda_graphs=True)
    with pytest.raises(ValueError, match="model.cuda_graphs='yes'"):
        speed.check("unet", cuda_graphs="yes")
    speed.check("unet", cuda_graphs=True)
    speed.check(None, cuda_graphs=False)


def test_compiled_with_inductors_graphs(compiled):
    unet = build_unet(8)
    speed.compile_unet(unet, "unet", cuda_graphs=True)
    assert compiled == [{"mode": "reduce-overhead"}]
    # channels-last's layout pass is a backend of its own: graphs go inside it, not as a mode
    compiled.clear()
    speed.compile_unet(unet, "unet", drop_layout_copies=True, cuda_graphs=True)
    (options,) = compiled
    assert "mode" not in options and callable(options["backend"])
    compiled.clear()
    speed.compile_unet(unet, "unet")
    assert compiled == [{}]


def test_without_cuda_it_says_why_and_compiles_plain(compiled, caplog):
    caplog.set_level(logging.WARNING, logger="sdtrain")
    unet = build_unet(8)
    assert speed.apply(unet, _hparams(), fsdp=False, device=torch.device("cpu")) is False
    assert compiled == [{}]  # compiled, without graphs
    (line,) = [r.getMessage() for r in caplog.records if "cuda_graphs" in r.getMessage()]
    assert "device cpu: CUDA graphs need a CUDA device" in line
    assert "\n" not in line
    compiled.clear()
    assert speed.apply(unet, _hparams(cuda_graphs=False), fsdp=False, device=None) is False


def test_a_cpu_run_with_graphs_asked_trains_and_says_why_not(
    tiny_model, shards, tmp_path, compiled, caplog
):
    """Through the config and the module's configure_model: the CPU run trains, compiled without
    graphs (compiling itself stubbed: Inductor's CPU build is the slow tests' part), and says why."""
    from sdtrain.cli.train import train

    caplog.set_level(logging.WARNING, logger="sdtrain")
    overrides = tiny_overrides(tiny_model, shards) + ["debug=fast", "logger=none"]
    assert train(
        compose_cfg(tmp_path, overrides + ["model.compile=unet", "model.cuda_graphs=true"])
    )
    assert compiled == [{}]  # the U-Net, once, with no graph mode
    said = [r.getMessage() for r in caplog.records if "model.cuda_graphs" in r.getMessage()]
    assert said == [
        "model.cuda_graphs: ordinary launches (device cpu: CUDA graphs need a CUDA device)"
    ]
    with pytest.raises(Exception, match="model.cuda_graphs=true needs model.compile"):
        train(compose_cfg(tmp_path / "refused", overrides + ["model.cuda_graphs=true"]))


def test_accumulation_and_fsdp_are_told_and_left_to_ordinary_launches():
    why = cuda_graphs.unusable(torch.device("cuda", 0), accumulate=4)
    assert why and "trainer.accumulate_grad_batches=4" in why
    assert cuda_graphs.unusable(torch.device("cuda", 0), accumulate=1) is None
    assert "trainer=fsdp" in cuda_graphs.unusable(torch.device("cuda", 0), fsdp=True)


def test_inductors_skip_reasons_are_told_once_each(caplog):
    """Inductor tells a region it will not graph to its own logger: the run says it once."""
    from torch._inductor import cudagraph_utils

    assert cudagraph_utils.cudagraphs_log.name == cuda_graphs.INDUCTOR_LOGGER
    caplog.set_level(logging.WARNING, logger="sdtrain")
    handler = cuda_graphs.watch_skips()
    assert cuda_graphs.watch_skips() is handler  # one handler a process
    start = len(handler.reasons)
    for _ in range(3):
        cudagraph_utils.log_cudagraph_skip_and_bump_counter(
            "skipping cudagraphs due to mutated inputs (2 instances)"
        )
    cudagraphs_log = cudagraph_utils.cudagraphs_log
    cudagraphs_log.warning("some other note")
    said = [r.getMessage() for r in caplog.records if r.name.startswith("sdtrain")]
    assert said == ["model.cuda_graphs: a compiled U-Net region runs with ordinary launches: "
                    "mutated inputs (2 instances)"]  # fmt: skip
    assert handler.reasons[start:] == ["mutated inputs (2 instances)"]


def test_a_changing_batch_shape_is_told_once(caplog):
    caplog.set_level(logging.WARNING, logger="sdtrain")
    steps = cuda_graphs.Steps()
    for shape in [(4, 4, 8, 8)] * 3 + [(2, 4, 8, 8), (4, 4, 8, 8), (3, 4, 8, 8)]:
        steps.begin(shape)
    said = [r.getMessage() for r in caplog.records if "batch shape" in r.getMessage()]
    assert len(said) == 1 and "(4, 4, 8, 8), then (2, 4, 8, 8)" in said[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_real_run_records_and_replays_graphs_on_cuda(tiny_model, shards, tmp_path, monkeypatch):
    """A compiled run with graphs records CUDA graphs, Inductor skips no region, and its weights
    after a few steps match the same compiled run without graphs (bf16 noise)."""
    from sdtrain.cli.train import train

    captures = []
    begin = torch.cuda.CUDAGraph.capture_begin

    def spy(self, *args, **kwargs):
        captures.append(1)
        return begin(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", spy)
    handler = cuda_graphs.watch_skips()
    skipped = len(handler.reasons)
    common = tiny_overrides(tiny_model, shards, steps=6) + [
        "trainer.accelerator=gpu", "trainer.devices=1", "logger=none", "model.compile=unet",
    ]  # fmt: skip
    weights = {}
    for graphs in (True, False):
        torch._dynamo.reset()
        run = tmp_path / f"graphs_{graphs}"
        train(compose_cfg(run, common + [f"model.cuda_graphs={str(graphs).lower()}"]))
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        state = ckpt["state_dict"]
        weights[graphs] = {k: v.float() for k, v in state.items() if k.startswith("unet.")}
        if graphs:
            assert captures, "no CUDA graph was recorded"
            assert handler.reasons[skipped:] == []
    assert weights[False]
    for name, w in weights[False].items():
        torch.testing.assert_close(weights[True][name], w, rtol=2e-2, atol=2e-3, msg=name)
