"""`make_tiny`: a tiny random model of either family (`sdtrain-tiny-model --family`, the demo's
resolver), by the family's builder."""

from __future__ import annotations

from pathlib import Path

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
