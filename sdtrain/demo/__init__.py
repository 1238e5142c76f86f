"""The built-in demo: its coloured shapes (`shapes`), its tiny random models (`tiny` for SD,
`tiny_sdxl` for SDXL; `make_tiny` picks by family), the judge of its samples, and the OmegaConf
resolvers that make the model and data on first use."""

from pathlib import Path

from sdtrain._moved import package_getattr

__getattr__ = package_getattr(__name__)

FAMILIES = ("sd", "sdxl")  # the families a tiny model is made of (`make_tiny`)


def make_tiny(
    out: str | Path, family: str = "sd", resolution: int = 32, vae_steps: int = 300, seed: int = 0
) -> Path:
    """Write a tiny random model of `family` ("sd": `tiny.make_tiny_model`, "sdxl":
    `tiny_sdxl.make_tiny_sdxl`) to `out` and return its path."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    if family == "sdxl":
        from sdtrain.demo.tiny_sdxl import make_tiny_sdxl as make
    else:
        from sdtrain.demo.tiny import make_tiny_model as make
    return Path(make(out, resolution, vae_steps, seed))
