"""A rank whose launcher is gone stops: a process started by Lightning's launcher (ranks > 0 on a
node) or by torchrun exits when its parent disappears, instead of waiting in a collective until
its timeout (NCCL: minutes). Lightning's own observer already ends the run when a child rank
exits with an error or is killed; this covers the other direction (rank 0, or torchrun's agent,
killed or failed)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)


def launched_by_a_parent(local_rank: int, lightning_child: bool) -> bool:
    """Whether this process's parent is its launcher: a child of Lightning's launcher or a
    torchrun worker (never a process a user started, whose shell may come and go)."""
    return lightning_child and local_rank > 0 or "TORCHELASTIC_RUN_ID" in os.environ


def exit_with_parent(period: float = 1.0) -> threading.Thread:
    """Start a daemon thread that ends this process (status 1) once its parent has gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(period)
            if os.getppid() != parent:
                print(
                    f"sdtrain: the launcher (pid {parent}) is gone: rank of pid {os.getpid()} stops",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread
