"""Which tests plain `pytest` picks: the slow ones only in CI (CI=true), and an explicit `-m` wins.

Collects a two-test file with this project's pytest settings (pyproject.toml's addopts) and
tests/conftest.py as a plugin, in a subprocess with the environment each case names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

TESTS = """
import pytest

def test_quick():
    pass

@pytest.mark.slow
def test_long():
    pass
"""


@pytest.mark.parametrize(
    "ci, args, want",
    [
        (None, [], ["test_quick"]),  # a plain `pytest` on a workstation
        ("true", [], ["test_quick", "test_long"]),  # the README's `pytest` in CI
        ("true", ["-m", "not slow"], ["test_quick"]),  # CI, told otherwise
        ("true", ["-m", "slow"], ["test_long"]),
    ],
    ids=["plain", "ci", "ci-not-slow", "ci-slow"],
)
def test_ci_runs_the_slow_tests_unless_told_otherwise(
    ci: str | None, args: list[str], want: list[str], tmp_path: Path
):
    (tmp_path / "test_pick.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    settings = ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-p", "tests.conftest"]
    cmd = [sys.executable, "-m", "pytest", *settings, "-p", "no:cacheprovider", "--collect-only"]
    cmd += ["-q", *args]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "test_pick.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = [line.rsplit("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line]
    assert got == want, proc.stdout
