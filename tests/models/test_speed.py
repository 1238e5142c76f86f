"""The fast settings' switches (sdtrain/models/speed.py) and their wiring into the module."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

from sdtrain.demo.tiny import build_parts
from sdtrain.models import speed
from sdtrain.training.module import StableDiffusionModule


def compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize("mode", ["unet", "blocks"])
def test_compile_in_place_keeps_names_and_outputs(mode: str):
    unet = build_parts(32).unet.eval()
    names = [n for n, _ in unet.named_parameters()]
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=c).sample
    speed.compile_unet(unet, mode, backend="eager")  # dynamo tracing without inductor's C++ build
    assert [n for n, _ in unet.named_parameters()] == names  # checkpoints and EMA unchanged
    if mode == "unet":
        assert compiled(unet)
    else:
        assert not compiled(unet) and all(compiled(b) for b in unet.down_blocks)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=c).sample, want)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="model.compile='whole'"):
        speed.check("whole")
    with pytest.raises(ValueError, match="float32_matmul_precision='fast'"):
        speed.set_float32_matmul_precision("fast")


def test_module_applies_channels_last_and_compile():
    m = StableDiffusionModule(
        build_parts(32), optimizer=partial(torch.optim.AdamW), compile=None, channels_last=True
    )
    m.configure_model()
    conv = m.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    with pytest.raises(ValueError, match="model.compile"):
        StableDiffusionModule(build_parts(32), optimizer=partial(torch.optim.AdamW), compile="all")


@pytest.fixture
def sdpa_flags():
    """SDPA kernel switches are process-wide: put them back after the test."""
    cuda = torch.backends.cuda
    saved = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled())
    yield
    cuda.enable_flash_sdp(saved[0])
    cuda.enable_mem_efficient_sdp(saved[1])
    cuda.enable_cudnn_sdp(saved[2])
    cuda.enable_math_sdp(True)


# The kernel a U-Net's attention runs on the CPU under each setting: the CPU has a flash kernel of
# its own and no efficient or cuDNN one, and its dispatch obeys the same process-wide switches, so
# "efficient" and "cudnn" (flash turned off) fall back to the math kernel.
CPU_KERNEL = {
    "flash": "aten::_scaled_dot_product_flash_attention_for_cpu",
    "efficient": "aten::_scaled_dot_product_attention_math",
    "cudnn": "aten::_scaled_dot_product_attention_math",
}


def sdpa_kernels(
    unet: torch.nn.Module, *inputs: torch.Tensor, **kw
) -> tuple[set[str], torch.Tensor]:
    """The SDPA kernels the U-Net's forward ran (profiler op names) and its output."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = unet(*inputs, **kw).sample
    kernels = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    return kernels, out


@pytest.mark.parametrize("name", ["flash", "efficient", "cudnn"])
def test_attention_allows_only_the_named_kernel_and_keeps_outputs(name: str, sdpa_flags):
    """The switches are set as named; the U-Net's attention then runs the kernel they allow (on
    the CPU: its flash kernel, or math when flash is off), and its output is the U-Net's with
    diffusers' plain attention (explicit softmax(QK^T)V, no SDPA): an independent reference."""
    from diffusers.models.attention_processor import AttnProcessor

    reference = build_parts(32).unet.eval()
    reference.set_attn_processor(AttnProcessor())
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=c).sample
    m = StableDiffusionModule(build_parts(32), optimizer=partial(torch.optim.AdamW), attention=name)
    m.unet.load_state_dict(reference.state_dict())
    m.configure_model()
    cuda = torch.backends.cuda
    on = {
        "flash": cuda.flash_sdp_enabled(),
        "efficient": cuda.mem_efficient_sdp_enabled(),
        "cudnn": cuda.cudnn_sdp_enabled(),
    }
    assert on == {k: k == name for k in on} and cuda.math_sdp_enabled()
    kernels, got = sdpa_kernels(m.unet.eval(), x, t, encoder_hidden_states=c)
    assert kernels == {CPU_KERNEL[name]}  # every attention of the U-Net took the allowed kernel
    # SDPA against the explicit product: ~7e-7 apart on outputs of size ~1 (fp32 rounding)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_attention_names_the_key():
    with pytest.raises(ValueError, match="model.attention='sage'"):
        StableDiffusionModule(
            build_parts(32), optimizer=partial(torch.optim.AdamW), attention="sage"
        )


def graph_breaks(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(*inputs).graph_break_count


def test_profiling_a_compiled_unet_records_no_module_hooks(caplog):
    """Lightning's PyTorchProfiler hooks every module by default, which splits a compiled U-Net
    into eager pieces (a trace of a step that never runs unprofiled: 69 graph breaks in the tiny
    U-Net); sdtrain turns the hooks off when the U-Net is compiled."""
    import lightning as L
    from lightning.pytorch.profilers import PyTorchProfiler
    from lightning.pytorch.profilers.pytorch import RegisterRecordFunction

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU(), torch.nn.Linear(4, 4))
    x = torch.randn(2, 4)
    assert graph_breaks(net, x) == 0
    with RegisterRecordFunction(net):  # what the profiler does with record_module_names=True
        assert graph_breaks(net, x) >= 2  # the graph splits at the hooks

    trainer = L.Trainer(profiler=PyTorchProfiler(), logger=False, enable_checkpointing=False)
    speed.profile_compiled_whole(trainer, None)  # eager: module names are harmless, kept
    assert trainer.profiler._record_module_names
    with caplog.at_level("WARNING", logger="sdtrain.models.speed"):
        speed.profile_compiled_whole(trainer, "unet")
    assert not trainer.profiler._record_module_names
    assert "record_module_names" in caplog.text


def test_cuda_alloc_conf_is_set_unless_the_user_set_one(monkeypatch):
    for k in speed.ALLOC_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    assert speed.use_cuda_alloc_conf(None) is None and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert speed.use_cuda_alloc_conf("expandable_segments:True") == "expandable_segments:True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.8")
    assert (
        speed.use_cuda_alloc_conf("expandable_segments:True") == "garbage_collection_threshold:0.8"
    )
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.8"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # torch's newer name
    assert speed.use_cuda_alloc_conf("expandable_segments:True") == "expandable_segments:False"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    with pytest.raises(ValueError, match="cuda_alloc_conf='yes'"):
        speed.use_cuda_alloc_conf("yes")


def test_train_sets_the_allocator_before_cuda(tiny_model, shards, tmp_path, monkeypatch):
    """sdtrain-train's default config sets expandable segments for the run (and its DDP children,
    which inherit the environment); a user's variable is left alone."""
    from sdtrain.cli.train import train
    from tests.conftest import compose_cfg, tiny_overrides

    for k in speed.ALLOC_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    cfg = compose_cfg(tmp_path / "a", tiny_overrides(tiny_model, shards, steps=1))
    assert cfg.cuda_alloc_conf == "expandable_segments:True"
    train(cfg)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    train(compose_cfg(tmp_path / "b", tiny_overrides(tiny_model, shards, steps=1)))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256"
