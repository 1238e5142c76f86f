"""A StableDiffusionModule that records what its training step draws (for tests, via config).

Set `model._target_=tests.training.recording.RecordingModule`; with SDTRAIN_RECORD_DIR set, each
rank appends one JSON line per micro-batch to `<dir>/rank<R>.jsonl`: step, rank, timesteps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdtrain.training.module import StableDiffusionModule


class RecordingModule(StableDiffusionModule):
    force_timesteps: torch.Tensor | None = None  # set by a test to pin the draws' timesteps

    def draw(self, latents: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        d = super().draw(latents, g)
        if self.force_timesteps is not None:
            d["t"] = self.force_timesteps.to(d["t"].device)
        out = os.environ.get("SDTRAIN_RECORD_DIR")
        if out:
            line = {"step": self.global_step, "rank": self.global_rank, "t": d["t"].tolist()}
            with open(Path(out) / f"rank{self.global_rank}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        return d

    def latents_and_context(self, batch, g):
        latents, context, d = super().latents_and_context(batch, g)
        self.record = {"latents": latents.detach(), "noise": d["noise"], "t": d["t"]}
        return latents, context, d

    def forward(self, noisy, timesteps, context):
        self.record["noisy"] = noisy.detach()
        return super().forward(noisy, timesteps, context)
