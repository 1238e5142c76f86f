"""Stop requests: SIGTERM, SIGUSR1 (SLURM's warning before it preempts or times out a job) and a
first Ctrl-C only note that a stop was asked for. Nothing runs inside the handler: no
collective, no checkpoint, no forwarding to other processes. `sdtrain.callbacks.stop.GroupStop`
reads the note at the next optimizer-step boundary, agrees with every rank (any rank's request
stops all), and the run stops there together: one checkpoint at that step, exit status 0,
`ckpt_path=last` resumes. A signal sent to the whole process group (SLURM, Kubernetes, `kill
-TERM -- -PGID`) reaches every rank once and ends the same way as one sent to a single rank.

A second Ctrl-C stops at once (KeyboardInterrupt, exit status 1).

Under SLURM with Lightning's auto-requeue (its SLURMEnvironment, detected under `srun`) SIGUSR1
is left to Lightning: its handler saves `hpc_ckpt_<n>.ckpt` in the run folder and runs
`scontrol requeue`. The requeue then ends the job with SIGTERM, which stops the run at the step
reached with `last.ckpt`, as above; scripts/slurm.sh resumes the requeued job from there.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class StopRequests:
    """Flag-only handlers for SIGTERM, SIGINT and (unless Lightning requeues) SIGUSR1."""

    def __init__(self) -> None:
        self.signal: str | None = None  # the first stop signal's name
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signal is None:
            self.signal = name
            hint = "; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
            log.warning(
                "received %s: stopping at the next optimizer step with a checkpoint%s", name, hint
            )

    def install(self, usr1: bool = True) -> None:
        """Take over the stop signals (from the main thread only; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            return
        signals = [signal.SIGTERM, signal.SIGINT]
        if usr1 and hasattr(signal, "SIGUSR1"):  # absent on Windows
            signals.append(signal.SIGUSR1)
        for sig in signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self.handler)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def lightning_requeues(trainer: Any) -> bool:
    """Whether Lightning's own SIGUSR1 handler (save, `scontrol requeue`) is meant to run."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    # the environment Lightning's signal connector checks (`_accelerator_connector` is private)
    env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return isinstance(env, SLURMEnvironment) and bool(env.auto_requeue)
