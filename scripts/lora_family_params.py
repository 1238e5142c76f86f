"""Trainable parameters of each LoRA-family type (README "The LoRA family") on the U-Nets of SD-1.5
and SDXL at their released shapes, counted on the meta device (no weights made, seconds on a CPU):

    python scripts/lora_family_params.py [--rank 16] [--json out.json]

Each type adapts the attention projections (experiment=lora's target_modules); "+ conv" adds
model.lora.conv_target_modules (locon's default set), which locon has by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from shaped_models import SDXL_UNET  # scripts/ is on the path: this file runs as a script

from sdtrain.models import lora_family
from sdtrain.models.lora import UNET_TARGETS

UNETS = {"SD-1.5": dict(sample_size=64, cross_attention_dim=768), "SDXL": SDXL_UNET}
ROWS = {  # name -> (type, with convolutions, options)
    "lora": ("lora", False, {}),
    "lora + dora": ("lora", False, {"dora": True}),
    "locon": ("locon", True, {}),
    "locon + dora": ("locon", True, {"dora": True}),
    "loha": ("loha", False, {}),
    "loha + conv": ("loha", True, {}),
    "lokr": ("lokr", False, {}),
    "lokr + conv": ("lokr", True, {}),
}


def count(unet_config: dict, type: str, conv: bool, rank: int, **options) -> int:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    unet.requires_grad_(False)
    if conv:
        options.setdefault("conv_target_modules", list(lora_family.LOCON_TARGETS))
    options = lora_family.check(type, **options)
    targets = [*UNET_TARGETS, *options.get("conv_target_modules", [])]
    unet.add_adapter(lora_family.peft_config(type, rank, rank, targets, **options))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", help="also write the counts here")
    a = p.parse_args()
    table = {
        row: {u: count(cfg, t, conv, a.rank, **dict(o)) for u, cfg in UNETS.items()}
        for row, (t, conv, o) in ROWS.items()
    }
    print(f"| model.lora (rank {a.rank}) | " + " | ".join(UNETS) + " |")
    print("| --- |" + " --- |" * len(UNETS))
    for row, counts in table.items():
        print(f"| {row} | " + " | ".join(f"{n / 1e6:.2f} M" for n in counts.values()) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rank": a.rank, "params": table}, indent=1))


if __name__ == "__main__":
    main()
