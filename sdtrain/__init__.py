"""sdtrain: distributed Stable Diffusion training (Hydra + Lightning + WebDataset + diffusers).

The packages, lowest layer first (each imports only from those above it in this list):

- `runtime/`   process plumbing: quiet logs, seeds, device helpers, loggers, preemption, sweep table
- `models/`    building the parts: the loader (`Parts`), model families, single files, LoRA, speed
- `sdtrain.datamodules` (`datamodules/`)  shards to batches, and the batch contract
- `artifacts/` what persists: checkpoint schema and atomic files, export, latent cache, shard
               writer, sampling to images
- `training/`  the LightningModule and what its step uses: diffusion maths, draws, EMA, non-finite
               guard, encoding, global batch, FSDP, validation loss, skip tally
- `sdtrain.callbacks` (`callbacks/`)  what a Trainer callback does
- `demo/`      the built-in demo: its shapes, its tiny model, its judge, the resolvers that make them
- `cli/`       thin entry points: train, sample, export, shards, cache-latents, tiny-model
"""

from sdtrain import _moved

__version__ = "0.1.0"

_moved.install()
__getattr__ = _moved.package_getattr(__name__)
