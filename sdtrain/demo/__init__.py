"""The built-in demo: its coloured shapes (`shapes`), its tiny random models (`tiny` for SD,
`tiny_sdxl` for SDXL; `make.make_tiny` picks by family), the judge of its samples, and the OmegaConf
resolvers that make the model and data on first use."""

from sdtrain._moved import package_getattr

__getattr__ = package_getattr(__name__)
