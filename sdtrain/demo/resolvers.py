"""OmegaConf resolvers that make the built-in demo's model and data on first use (then reuse them).

    model.pretrained: ${sdtrain.demo_model:${paths.cache_dir}/tiny-sd-v2-32,32}
    model.pretrained: ${sdtrain.demo_model:${paths.cache_dir}/tiny-sdxl-v1-32,32,sdxl}  (SDXL)
    data.train_shards: ${sdtrain.demo_shards:${paths.cache_dir}/demo-shards-v1-32,32,960}

Both build in a temporary folder under a file lock and rename it into place, so concurrent ranks
and interrupted runs never see a half-written folder.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _build_once(path: str | Path, build: Callable[[Path], None], what: str) -> Path:
    """`path`, built by `build` in a temporary folder first if missing; logs what it makes."""
    from filelock import FileLock

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            log.info("first run: making %s in %s (once; later runs reuse it)", what, path)
            start = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
            try:
                build(tmp)
                tmp.rename(path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("made %s in %.1f s", what, time.perf_counter() - start)
    return path


def demo_model(path: str, resolution: int = 32, family: str = "sd") -> str:
    """Path of the tiny demo model of `family` ("sd" or "sdxl"), made there first if missing."""
    from sdtrain.demo.make import make_tiny

    kind = {"sd": "Stable Diffusion", "sdxl": "SDXL"}.get(str(family), str(family))
    what = f"the tiny demo model (a random {kind}; its VAE gets an autoencoder fit)"

    def build(tmp: Path) -> None:
        make_tiny(tmp, str(family), resolution=int(resolution))

    return str(_build_once(path, build, what))


def demo_shards(path: str, resolution: int = 32, count: int = 960, seed: int = 0) -> str:
    """Brace pattern of the demo shards, made there first if missing (4 shards); another `seed`
    draws other shapes (the held-out set)."""
    from sdtrain.artifacts.shards import write_shards
    from sdtrain.demo import shapes as demo

    def build(tmp: Path) -> None:
        folder = demo.write_folder(tmp / "images", int(count), int(resolution), int(seed))
        write_shards(folder, tmp, samples_per_shard=-(-int(count) // 4))
        shutil.rmtree(folder)

    out = _build_once(path, build, f"the demo data ({int(count)} captioned images in 4 shards)")
    n = len(list(out.glob("*.tar")))
    return f"{out}/{{00000..{n - 1:05d}}}.tar"


def model_configs(pretrained: str, single_file_config: str | None = None) -> str:
    """The folder of the model's configs and tokenizer (what `data.tokenizer` reads):
    `model.pretrained`, or `model.single_file_config` when pretrained is a single file."""
    from sdtrain.models.single_file import is_single_file

    if single_file_config and is_single_file(pretrained):
        return str(single_file_config)
    return pretrained


def sweep_group() -> str | None:
    """In a multirun, its sweep folder's name (one W&B group per sweep: `logger.wandb.group`);
    None in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(str(HydraConfig.get().sweep.dir)).name


def check_demo_data(data: DictConfig) -> None:
    """Refuse your own `data.train_shards` under the demo's data group (`data=demo`, the default):
    the rest of that group is the demo's (32 px, `random_flip=true` for its mirror-symmetric
    shapes, one loader worker, its own validation shapes) and would apply to your images
    silently: a mirrored letter or face trains as its caption, and the validation loss measures
    shapes."""
    raw = OmegaConf.to_container(data, resolve=False)
    demo = "${sdtrain.demo_shards:"
    if str(raw.get("val_shards") or "").startswith(demo) and not str(
        raw.get("train_shards") or ""
    ).startswith(demo):
        raise ValueError(
            f"data.train_shards={raw.get('train_shards')} replaces the demo's shards, but the rest "
            "of the data group is still the demo's (data=demo: resolution 32, random_flip=true "
            "for its mirror-symmetric shapes, 1 loader worker, its own validation shapes): add "
            "data=webdataset (or an experiment=finetune / finetune_sd15 / lora / pretrain, "
            "which sets it) to train your own shards"
        )


def register() -> None:
    for name, fn in (
        ("sdtrain.demo_model", demo_model),
        ("sdtrain.demo_shards", demo_shards),
        ("sdtrain.sweep_group", sweep_group),
        ("sdtrain.model_configs", model_configs),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
