"""Module paths from before sdtrain was grouped into packages: importing one (a config's
`_target_: sdtrain.module.StableDiffusionModule`, a script's `from sdtrain import ema`) fails with
an error that names the new path."""

from __future__ import annotations

import importlib
import importlib.abc
import sys

MOVED = {
    "seeds": "runtime.seeds", "quiet": "runtime.quiet", "preemption": "runtime.preemption",
    "loggers": "runtime.loggers", "sweep_table": "runtime.sweep_table",
    "single_file": "models.single_file", "lora": "models.lora", "speed": "models.speed",
    "attention": "models.attention", "layout": "models.layout",
    "batch": "datamodules.batch",
    "checkpoint": "artifacts.checkpoint", "checkpoint_io": "artifacts.checkpoint_io",
    "export": "artifacts.export", "export_lora": "artifacts.export_lora", "cache": "artifacts.cache",
    "shards": "artifacts.shards", "sampling": "artifacts.sampling", "sample": "artifacts.sample",
    "module": "training.module", "diffusion": "training.diffusion", "draws": "training.draws",
    "ema": "training.ema", "nonfinite": "training.nonfinite", "encoding": "training.encoding",
    "batching": "training.batching", "sharding": "training.sharding",
    "validation": "training.validation", "skips": "training.skips",
    "judge": "demo.judge", "tiny": "demo.tiny", "tiny_single": "demo.tiny_single",
    "resolvers": "demo.resolvers",
}  # fmt: skip
# Names that were modules and are packages now: what used to be their attributes.
MOVED_ATTRIBUTES = {"models": ("models.parts", "models.loader"), "demo": ("demo.shapes",)}


def new_home(package: str, attr: str) -> str | None:
    """Where `attr` of the old module `sdtrain.<package>` lives now, or None."""
    for module in MOVED_ATTRIBUTES[package]:
        if hasattr(importlib.import_module(f"sdtrain.{module}"), attr):
            return f"sdtrain.{module}.{attr}"
    return None


def message(old: str, new: str) -> str:
    return f"{old} moved to {new} (sdtrain's modules are grouped by concern: see the README's Architecture)"


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Consulted last, for names no real module has: `import sdtrain.ema`, and the dotted paths
    Hydra imports (`sdtrain.module.StableDiffusionModule`, `sdtrain.models.load_parts`)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != "sdtrain":
            return None
        if name.split(".")[0] in MOVED:
            old = f"sdtrain.{name.split('.')[0]}"
            raise ModuleNotFoundError(message(old, f"sdtrain.{MOVED[name.split('.')[0]]}"))
        package, _, attr = name.partition(".")
        if package in MOVED_ATTRIBUTES and attr.isidentifier():
            new = new_home(package, attr)
            if new:
                raise ModuleNotFoundError(message(fullname, new))
        return None


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def package_getattr(package: str):
    """A package's `__getattr__` (PEP 562) for what used to be importable from it: `from sdtrain
    import ema` and `from sdtrain.models import load_parts` raise an ImportError naming the new
    path (an AttributeError would become Python's bare "cannot import name")."""
    old = package.removeprefix("sdtrain.")

    def __getattr__(attr: str):
        if package == "sdtrain" and attr in MOVED:
            raise ImportError(message(f"sdtrain.{attr}", f"sdtrain.{MOVED[attr]}"))
        new = new_home(old, attr) if old in MOVED_ATTRIBUTES and not attr.startswith("__") else None
        if new:
            raise ImportError(message(f"{package}.{attr}", new))
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    return __getattr__
