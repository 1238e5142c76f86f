"""The docs match the code: `sdtrain-train --help` shows the examples of train.py's docstring,
and the sweep file sweeps what the README says it does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import sdtrain.cli.train
from tests.conftest import CONF, ROOT
from tests.readme_blocks import BLOCKS
from tests.test_train import _cli


def test_help_lists_the_docstring_examples(tmp_path: Path):
    proc = _cli(["--help"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    examples = [
        x for x in sdtrain.cli.train.__doc__.splitlines() if re.match(r"[\w ]+:\s{2,}\S", x)
    ]
    assert len(examples) >= 7
    missing = [x for x in examples if x not in proc.stdout.splitlines()]
    assert not missing, missing
    assert re.search(r"trainer: cpu, ddp, default, \S", proc.stdout)  # Hydra's group listing stays


def sweep(values: dict[str, str]) -> dict[str, list]:
    """key -> the list of values, as Hydra parses a sweep."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in values.items()])
    return {o.key_or_group: list(o.sweep_iterator()) for o in parsed}


def test_lr_sweep_sweeps_what_the_readme_says():
    (block,) = [b for b in BLOCKS if b.id == "sweep-hyperparameters"]
    grid, from_file = (shlex.split(c) for c in block.commands)
    assert from_file == ["sdtrain-train", "hparams_search=lr_sweep"]
    readme = dict(a.split("=", 1) for a in grid if "=" in a)
    text = (ROOT / "README.md").read_text()
    assert "# the same, from a file" in text
    params = OmegaConf.load(CONF / "hparams_search" / "lr_sweep.yaml").hydra.sweeper.params
    assert sweep(readme) == sweep({k: str(v) for k, v in params.items()})
