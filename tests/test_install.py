"""A non-editable install works without the source tree: the wheel, then a run from it.

The wheel is built from a copy of the repository (an in-tree build would leave build/ behind, whose
stale files later builds pick up), its file list is checked against the source tree, and it is
installed into a fresh venv outside the repository. That venv reaches the dependencies through a
path line in a .pth file: the directories are put on sys.path, but the .pth files inside them are
not run, so the editable install's meta-path finder (which maps sdtrain.conf, sdtrain.callbacks and
sdtrain.datamodules onto the source folders) is not active. With it active, a wheel that lacked
those packages would still import them from the source tree, and this test could not fail.

Everything runs in subprocesses, from a folder outside the repository, with PWD set to it (the
configs read PWD) and one torch thread. Slow (~45 s on a 2-core CPU, most of it the demo making
its tiny model and data in a fresh cache).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders of the source tree that go into the wheel under sdtrain/ (pyproject's
# [tool.setuptools.package-dir]).
MAPPED = {
    "callbacks": "sdtrain/callbacks",
    "datamodules": "sdtrain/datamodules",
    "conf": "sdtrain/conf",
}
# Left out of the copy the wheel is built from: VCS, venvs, caches, earlier build outputs, runs.
NOT_COPIED = {"build", "dist", "outputs", "multirun", "wandb", "__pycache__"}

# Runs inside the installed venv: where sdtrain and every module of it come from, and what the
# import machinery looks like. Prints one JSON object.
PROBE = r"""
import importlib, importlib.metadata, json, pkgutil, sys
from importlib import resources

import sdtrain

names = ["sdtrain"] + sorted(m.name for m in pkgutil.walk_packages(sdtrain.__path__, "sdtrain."))
files = {n: getattr(importlib.import_module(n), "__file__", None) for n in names}


def yamls(node, prefix=""):
    for child in node.iterdir():
        if child.is_dir():
            yield from yamls(child, f"{prefix}{child.name}/")
        elif child.name.endswith(".yaml"):
            yield prefix + child.name


dist = importlib.metadata.distribution("sdtrain")
print(json.dumps({
    "files": files,
    "yamls": sorted(yamls(resources.files("sdtrain.conf"))),
    "sys_path": sys.path,
    "meta_path": [getattr(f, "__name__", type(f).__name__) for f in sys.meta_path],
    "dist_files": [str(dist.locate_file(f)) for f in dist.files if f.name == "__init__.py"],
    "scripts": sorted(e.name for e in dist.entry_points if e.group == "console_scripts"),
}))
"""


@dataclass
class Install:
    python: Path  # the fresh venv's interpreter
    bin: Path  # its scripts folder (console scripts land here)
    site: Path  # its site-packages, where the wheel went
    work: Path  # a folder outside the repository to run from


def source_files(folder: str, suffix: str) -> set[str]:
    """Paths (relative to `folder`) of the source tree's files ending in `suffix`."""
    base = ROOT / folder
    return {
        p.relative_to(base).as_posix()
        for p in base.rglob(f"*{suffix}")
        if "__pycache__" not in p.parts and p.is_file()
    }


def copy_source(dst: Path) -> Path:
    """The repository without its hidden folders (.git, .venv, ...), build outputs and runs."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder).resolve() == ROOT
        return {
            n
            for n in names
            if n in NOT_COPIED or n.endswith((".egg-info", ".pyc")) or (top and n.startswith("."))
        }

    return Path(shutil.copytree(ROOT, dst, ignore=ignore))


def can_build_without_isolation() -> bool:
    """setuptools installed, and new enough to write wheels itself (or `wheel` is there).

    Read from its metadata: importing setuptools here would clash with the distutils already
    imported in this process.
    """
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def run(cmd: list[str | Path], cwd: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """Run `cmd` in `cwd` with PWD pointing there and nothing steering imports to the source tree."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    full_env.update(PWD=str(cwd), HYDRA_FULL_ERROR="1", **env)
    # One torch thread unless told otherwise: beside another torch process on a 2-core machine,
    # OpenMP's spinning threads made the demo's first use ~80x slower (over 10 min, not ~20 s).
    full_env["OMP_NUM_THREADS"] = full_env.get("OMP_NUM_THREADS") or "1"
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`proc`, asserted to have exited 0 (its command, shortened, and output tails if not)."""
    cmd = " ".join(a if len(a) < 200 else a[:40] + "..." for a in proc.args)
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this environment")
    tmp = tmp_path_factory.mktemp("wheel")
    src = copy_source(tmp / "src")
    isolation = ["--no-build-isolation"] if can_build_without_isolation() else []
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", tmp / "dist"]
    check(run([*cmd, src], cwd=tmp, timeout=600))
    (whl,) = (tmp / "dist").glob("sdtrain-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Install:
    """The wheel in a fresh venv whose only view of the dependencies is a .pth path line."""
    tmp = tmp_path_factory.mktemp("install")
    env = tmp / "venv"
    check(run([sys.executable, "-m", "venv", "--without-pip", env], cwd=tmp, timeout=120))
    bindir = env / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    venv_site = Path(check(run([python, "-c", where], cwd=tmp, timeout=60)).stdout.strip())
    deps = [
        *site.getsitepackages(),
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
    ]
    if site.ENABLE_USER_SITE:
        deps.append(site.getusersitepackages())
    lines = dict.fromkeys(str(Path(d).resolve()) for d in deps if Path(d).is_dir())
    assert str(ROOT) not in lines, lines  # a venv inside the repository is fine; its root is not
    (venv_site / "_sdtrain_test_deps.pth").write_text("".join(f"{d}\n" for d in lines))
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
    check(run([*pip, "-q", wheel], cwd=tmp, timeout=300))
    work = tmp / "work"
    work.mkdir()
    return Install(python=python, bin=bindir, site=venv_site.resolve(), work=work)


def test_wheel_holds_the_package_and_nothing_else(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    files = {n for n in names if not n.endswith("/")}
    tops = {n.split("/", 1)[0] for n in files}
    assert "sdtrain" in tops, sorted(tops)
    assert all(
        t == "sdtrain" or (t.startswith("sdtrain-") and t.endswith(".dist-info")) for t in tops
    ), sorted(tops)
    for stray in ("callbacks", "datamodules", "conf", "tests", "scripts", "docs"):
        assert not any(n.startswith(f"{stray}/") for n in names), stray
    assert "sdtrain/conf/train.yaml" in files
    # Every config, callback and datamodule of the source tree, at its place in the package.
    for folder, suffix in [
        ("conf", ".yaml"),
        ("conf", ".py"),
        ("callbacks", ".py"),
        ("datamodules", ".py"),
    ]:
        want = {f"{MAPPED[folder]}/{f}" for f in source_files(folder, suffix)}
        got = {f for f in files if f.startswith(f"{MAPPED[folder]}/") and f.endswith(suffix)}
        assert got == want, (folder, suffix, sorted(want ^ got))
    assert any(f.count("/") == 3 for f in files if f.startswith("sdtrain/conf/")), (
        "no group configs"
    )
    want = {f"sdtrain/{f}" for f in source_files("sdtrain", ".py")}
    assert want <= files, sorted(want - files)
    (top_level,) = (n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["sdtrain"]


def test_installed_copy_is_what_imports(installed: Install):
    probe = json.loads(
        check(run([installed.python, "-c", PROBE], cwd=installed.work, timeout=300)).stdout
    )
    files = probe["files"]
    outside = {
        n: f
        for n, f in files.items()
        if f is None or installed.site not in Path(f).resolve().parents
    }
    assert not outside, f"not from {installed.site}: {outside}"
    on_path = {str((installed.work / p).resolve()) for p in probe["sys_path"]}  # "" is the cwd
    assert str(ROOT) not in on_path, probe["sys_path"]
    assert not any("Editable" in f for f in probe["meta_path"]), probe["meta_path"]
    assert all(installed.site in Path(f).resolve().parents for f in probe["dist_files"])
    # Every module of the source tree, imported from the installed copy.
    want = {"sdtrain", "sdtrain.callbacks", "sdtrain.datamodules", "sdtrain.conf"}
    for folder, package in [
        ("sdtrain", "sdtrain"),
        ("callbacks", "sdtrain.callbacks"),
        ("datamodules", "sdtrain.datamodules"),
    ]:
        want |= {
            f"{package}.{Path(f).stem}"
            for f in source_files(folder, ".py")
            if "/" not in f and f != "__init__.py"
        }
    assert want <= files.keys(), sorted(want - files.keys())
    assert set(probe["yamls"]) == source_files("conf", ".yaml")
    assert set(probe["scripts"]) >= {
        "sdtrain-train",
        "sdtrain-shards",
        "sdtrain-tiny-model",
        "sdtrain-export",
        "sdtrain-sample",
    }


def test_config_composes_from_the_installed_package(installed: Install):
    proc = check(
        run(
            [installed.python, "-m", "sdtrain.cli.train", "--cfg", "job"],
            cwd=installed.work,
            timeout=300,
        )
    )
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["task_name"] == "train"
    assert cfg["data"]["_target_"].startswith("sdtrain.datamodules.")
    assert cfg["callbacks"]["model_checkpoint"]["_target_"].startswith("sdtrain.callbacks.")
    assert cfg["trainer"]["_target_"] == "lightning.pytorch.Trainer"
    assert "model" in cfg and "paths" in cfg


def test_short_demo_run_from_the_installed_package(installed: Install, tmp_path: Path):
    """Two CPU steps of the demo (tiny model and shapes data made in a fresh cache) via sdtrain-train,
    with the configured callbacks: checkpoints, EMA, samples and throughput all come from the wheel."""
    run_dir = tmp_path / "run"
    cmd = [
        installed.bin / "sdtrain-train",
        f"hydra.run.dir={run_dir}",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "data.num_workers=0",
        "data.batch_size=4",
        "callbacks.sample_images.num_inference_steps=2",
        "callbacks.sample_images.every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.throughput.window=2",
    ]
    proc = check(run(cmd, cwd=installed.work, timeout=600, SDTRAIN_CACHE=str(tmp_path / "cache")))
    # progress_log's summary (Lightning's own "max_steps=2 reached" is silenced: sdtrain/runtime/quiet.py)
    assert "finished at step 2/2:" in proc.stderr + proc.stdout
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "step_0000002.ckpt",
    ]
    assert [p.name for p in (run_dir / "samples").glob("*.png")] == ["step_0000002.png"]
    assert not (installed.work / "outputs").exists()  # everything went to hydra.run.dir
