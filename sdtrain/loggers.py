"""Logger factories used from config."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_has_credentials() -> bool:
    """True when W&B could log in without asking: WANDB_API_KEY or a netrc entry for its host.

    The netrc file is $NETRC when set (as W&B reads it), else ~/.netrc.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb(
    project: str,
    save_dir: str,
    name: str | None = None,
    offline: bool | None = None,
    **kwargs,
) -> WandbLogger:
    """A WandbLogger that never prompts: offline unless credentials exist (or offline=False).

    An offline run lands in `<save_dir>/wandb/offline-run-*`; upload it later with
    `wandb sync <that folder>`.
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not (
            wandb_has_credentials()
        )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, name=name, offline=offline, **kwargs)
