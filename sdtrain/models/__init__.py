"""Building the parts of a Stable Diffusion: the loader (`parts`), model families (`family`), single-file
checkpoints, LoRA, tiny models' loaders and the U-Net's speed settings."""

from sdtrain._moved import package_getattr

__getattr__ = package_getattr(__name__)
