"""Preemption: SIGUSR1 (SLURM ``--signal=USR1@120``) or SIGTERM -> finish the step, save, exit."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Records that a preemption signal arrived; the loop polls ``requested`` between steps
    (all ranks agree through an all-reduce, since SLURM may signal only some of them)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("received %s: will save after this step and exit", self.signal_name)

    def __enter__(self) -> PreemptionFlag:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running under SLURM; True if it was requeued."""
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    if task_id := os.environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{job_id}_{task_id}"
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        logger.error("could not requeue SLURM job %s: %s", job_id, err)
        return False
    logger.warning("requeued SLURM job %s; it resumes from the latest checkpoint", job_id)
    return True
