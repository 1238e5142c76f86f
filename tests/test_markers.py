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

SLOW_FIRST = """
import pytest

@pytest.mark.slow
def test_long():
    pass

def test_quick():
    pass
"""


def run_pytest(tmp_path: Path, env_set: dict[str, str], args: list[str], tests: str = TESTS):
    (tmp_path / "test_pick.py").write_text(tests)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(env_set)
    settings = ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-p", "tests.conftest"]
    cmd = [sys.executable, "-m", "pytest", *settings, "-p", "no:cacheprovider", *args]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "test_pick.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


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
    env = {} if ci is None else {"CI": ci}
    out = run_pytest(tmp_path, env, ["--collect-only", "-q", *args])
    got = [line.rsplit("::", 1)[1] for line in out.splitlines() if "::" in line]
    assert got == want, out


ORDERED = """
import pytest

@pytest.mark.slow
def test_long():
    pass

@pytest.mark.slow(ci="first")
def test_for_time():
    pass

def test_quick():
    pass
"""


def test_ci_runs_the_tests_slow_for_time_only_right_after_the_default_ones(tmp_path: Path):
    env = {"CI": "true", "SDTRAIN_CI_SLOW_BUDGET_S": "600"}
    out = run_pytest(tmp_path, env, ["-v"], tests=ORDERED)
    ran = [line.split("::", 1)[1].split()[0] for line in out.splitlines() if "%]" in line]
    assert ran == ["test_quick", "test_for_time", "test_long"], out
    plain = run_pytest(tmp_path, {}, ["--collect-only", "-q"], tests=ORDERED)
    assert [x.rsplit("::", 1)[1] for x in plain.splitlines() if "::" in x] == ["test_quick"]


@pytest.mark.parametrize("budget, long_runs", [("0", False), ("600", True)])
def test_ci_runs_the_slow_tests_last_and_only_within_its_time_budget(
    budget: str, long_runs: bool, tmp_path: Path
):
    env = {"CI": "true", "SDTRAIN_CI_SLOW_BUDGET_S": budget}
    out = run_pytest(tmp_path, env, ["-v"], tests=SLOW_FIRST)
    ran = [line.split("::", 1)[1].split()[0] for line in out.splitlines() if "%]" in line]
    assert ran == ["test_quick", "test_long"], out  # defined first, run last
    assert "test_quick PASSED" in out
    if long_runs:
        assert "test_long PASSED" in out, out
    else:
        assert "test_long SKIPPED" in out and "CI time budget" in out, out
