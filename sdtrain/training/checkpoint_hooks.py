"""What a training checkpoint holds beyond Lightning's own: a mixin of
`sdtrain.training.module.StableDiffusionModule` (its `unet`, `text_encoder`, `ema`, `skips`,
`nonfinite`, `noise_scheduler`, `pretrained`, `single_file_config`), kept apart from the step.
The schema is `sdtrain.artifacts.checkpoint`'s."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger

from sdtrain.artifacts import checkpoint
from sdtrain.models import lora, textual_inversion
from sdtrain.training import sharding


class CheckpointHooks:
    """`on_save_checkpoint` / `on_load_checkpoint` of the module."""

    def on_save_checkpoint(self, ckpt: dict[str, Any]) -> None:
        """Keep the trainable weights only; add the schema's entry (sdtrain.artifacts.checkpoint)."""
        self.nonfinite.settle(self.global_step, stop=False)  # its count, read from the device
        keep = lora.checkpoint_keys(self.unet, self.text_encoder)
        checkpoint.trainable_only(ckpt["state_dict"], keep)
        wandb_ids = [lg.version for lg in self.loggers if isinstance(lg, WandbLogger)]
        cfg = self.noise_scheduler.config
        run = {
            "pretrained": self.pretrained,
            "single_file_config": self.single_file_config,  # a single file's configs folder
            "unet_config": checkpoint.plain(dict(self.unet.config)),
            "prediction_type": self.noise_scheduler.config.prediction_type,
            "wandb_run_id": wandb_ids[0] if wandb_ids else None,  # a resume logs on into it
            "lora": lora.describe(self.unet, self.text_encoder),  # export rebuilds the adapters
            "zero_terminal_snr": bool(cfg.get("rescale_betas_zero_snr", False)),  # export keeps it
            "textual_inversion": textual_inversion.describe(self.text_encoder),  # export adds them
        }
        gather = not sharding.saves_sharded(self._trainer and self._trainer.strategy)  # or shards
        writes = self._trainer is None or self._trainer.is_global_zero  # a whole file: rank 0's
        ema = self.ema.state_dict(gather, writes) if self.ema is not None else None
        skips = self.skips.state()
        ckpt[checkpoint.ROOT] = checkpoint.build(
            run, ema, skips["total"], self.nonfinite.total, skips["by_kind"], skips["drawn"]
        )

    def on_load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        checkpoint.upgrade(ckpt)
        sd = ckpt.get("state_dict")  # absent under FSDP: the strategy loaded the weights itself
        keys = lora.checkpoint_keys(self.unet, self.text_encoder)  # what this run trains
        missing = sorted(k for k in keys if sd is not None and k not in sd)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trained weights, e.g. {missing[0]}")
        ema_state = checkpoint.ema_state(ckpt)
        if self.ema is not None and ema_state is not None:
            self.ema.load_state_dict(ema_state)
        entry = ckpt[checkpoint.ROOT]
        self.nonfinite.total = int(entry.get("skipped_nonfinite", 0))
        by_kind = entry.get("skipped_by_kind") or {}
        self.skips.load(checkpoint.skipped_total(ckpt), by_kind, int(entry.get("drawn_total", 0)))
