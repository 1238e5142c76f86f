"""scripts/experiment_memory.py: each experiment's variants set the saver they name (composed as
sdtrain-train composes them), and the script runs end to end on the CPU with --tiny (slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import experiment_memory as em  # noqa: E402


@pytest.mark.parametrize("name", ["finetune_sd15", "lora", "textual_inversion", "sdxl_finetune"])
def test_each_variant_sets_its_saver(name: str):
    cfg = em.experiment_config(name)
    variants = em.variants(name, cfg)
    # grad_ckpt only where the experiment lacks it (the SDXL ones ship it on)
    assert ("grad_ckpt" in variants) == (not cfg.model.gradient_checkpointing)
    for saver, overrides in variants.items():
        cached = ["data=latents", "data.train_shards=x", "data.buckets=null"]
        data = cached if saver in ("latents", "offload", "all") else []
        got = em.experiment_config(name, data + overrides)
        eight = got.model.optimizer._target_ == "bitsandbytes.optim.AdamW8bit"
        assert eight == (saver in ("adamw8bit", "all")), saver
        assert (got.model.ema.device == "cpu") == (saver in ("ema_cpu", "all")), saver
        assert got.model.gradient_checkpointing == (
            saver in ("grad_ckpt", "all") or bool(cfg.model.gradient_checkpointing)
        )
        assert got.model.offload_frozen == {"offload": True, "all": True, "latents": False}.get(
            saver, "auto"
        )
    # the cache holds text unless the text encoder trains (new tokens' rows)
    assert em.text_trains(cfg) == (name == "textual_inversion")


@pytest.mark.slow
def test_runs_end_to_end_with_tiny_models(tmp_path: Path, capsys):
    """~100 s: the tiny SDXL as shipped and with every saver (8-bit AdamW, EMA on the host,
    latents and text cached, offload), one step each, through sdtrain-train."""
    out = tmp_path / "memory.json"
    args = ["--tiny", "--experiments", "sdxl_lora", "--savers", "shipped", "all"]
    rows = em.main([*args, "--steps", "1", "--work", str(tmp_path / "work"), "--json", str(out)])
    assert [(r["saver"], r["status"]) for r in rows] == [("shipped", "ok"), ("all", "ok")]
    assert json.loads(out.read_text()) == rows
    for r in rows:  # each run's own record: one step on the CPU (no memory numbers there)
        peak = json.loads((tmp_path / "work" / "runs" / f"sdxl_lora-{r['saver']}" /
                           "peak_memory.json").read_text())  # fmt: skip
        assert peak == {"steps": 1, "device": "cpu"}
    assert "sdxl_lora          all" in capsys.readouterr().out
