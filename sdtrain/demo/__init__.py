"""The built-in demo: its coloured shapes (`shapes`), its tiny random model (`tiny`), the judge of its
samples, and the OmegaConf resolvers that make the model and data on first use."""

from sdtrain._moved import package_getattr

__getattr__ = package_getattr(__name__)
