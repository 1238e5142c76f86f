"""Preemption: SIGUSR1 (SLURM's warning before it preempts or times out a job) stops a run the
way SIGTERM does: Lightning finishes the current batch, the checkpoint callback saves at the step
reached (`save_on_exception`), and the process exits 0; `ckpt_path=last` resumes from there.

Under SLURM with Lightning's auto-requeue (its SLURMEnvironment, detected under `srun`), this
one steps aside: Lightning installs its own SIGUSR1 handler during `fit` only where none is
installed yet, and that one saves `hpc_ckpt_<n>.ckpt` in the run folder and runs
`scontrol requeue`. The requeue then ends the job with SIGTERM, which stops the run at the step
reached with `last.ckpt`, as above; scripts/slurm.sh resumes the requeued job from there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


def _forward_to_sigterm(signum, frame) -> None:
    log.warning("received SIGUSR1: stopping at this step with a checkpoint (as for SIGTERM)")
    os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM handler takes it from here


@contextmanager
def usr1_stops_like_sigterm(trainer: Any = None) -> Iterator[None]:
    """Within the scope SIGUSR1 is SIGTERM, unless someone else already handles SIGUSR1 or
    `trainer` (a lightning Trainer) will: SLURM with auto-requeue."""
    usr1 = getattr(signal, "SIGUSR1", None)  # absent on Windows
    main = threading.current_thread() is threading.main_thread()
    if usr1 is None or not main or (trainer is not None and lightning_requeues(trainer)):
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


def lightning_requeues(trainer: Any) -> bool:
    """Whether Lightning's own SIGUSR1 handler (save, `scontrol requeue`) is meant to run."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    # the environment Lightning's signal connector checks (`_accelerator_connector` is private)
    env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return isinstance(env, SLURMEnvironment) and bool(env.auto_requeue)
