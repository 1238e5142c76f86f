"""Preemption: SIGUSR1 (SLURM's warning before it preempts or times out a job) stops a run the
way SIGTERM does: Lightning finishes the current batch, the checkpoint callback saves at the step
reached (`save_on_exception`), and the process exits 0; `ckpt_path=last` resumes from there.

Under SLURM with Lightning's auto-requeue, Lightning installs its own SIGUSR1 handler during `fit`
(save and `scontrol requeue`), which takes precedence over this one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def _forward_to_sigterm(signum, frame) -> None:
    log.warning("received SIGUSR1: stopping at this step with a checkpoint (as for SIGTERM)")
    os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM handler takes it from here


@contextmanager
def usr1_stops_like_sigterm() -> Iterator[None]:
    """Within the scope SIGUSR1 is SIGTERM, unless someone else already handles SIGUSR1."""
    usr1 = getattr(signal, "SIGUSR1", None)  # absent on Windows
    if usr1 is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(usr1)
    if previous not in (signal.SIG_DFL, None):
        yield
        return
    signal.signal(usr1, _forward_to_sigterm)
    try:
        yield
    finally:
        signal.signal(usr1, previous)
