"""scripts/fusion_check.py: Inductor fuses the U-Net's GroupNorm + SiLU and its GeGLU (issue 29
item 2), forward and backward, and the compiled modules match diffusers' eager ones."""

from __future__ import annotations

import pytest

from scripts import fusion_check


@pytest.mark.slow(ci="first")  # for time only: CI runs it right after the default tests
def test_inductor_fuses_groupnorm_silu_and_geglu_in_diffusers_modules():
    report = fusion_check.run(tiny=True, device="cpu")
    for pattern in ("groupnorm_silu", "geglu"):
        got = report[pattern]
        assert got["forward_fused"], (pattern, got["forward_kernels"])
        assert got["backward_fused"], (pattern, got["backward_kernels"])
        assert got["max_diff_out"] < 1e-4 and got["max_diff_grad"] < 1e-6, (pattern, got)
    # the check itself can fail: a kernel list without the pair is not counted as fused
    assert not fusion_check.fused(
        ["cpp_fused_native_group_norm_0", "cpp_fused_silu_1"], ("native_group_norm", "silu")
    )
