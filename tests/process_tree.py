"""Simulate a crash: SIGKILL a launched command and every process under it."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts each worker in its own
    session and multiprocessing pools fork children, so a process group does not reach them all).
    The calling process, when it is one of them, goes last, so that none is left running."""
    import psutil

    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for p in sorted(tree, key=lambda p: p.pid == os.getpid()):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def crash_after_save_env(checkpoint: Path, pythonpath: str) -> dict[str, str]:
    """Environment entries that SIGKILL a launched run, every process under the launch, the
    moment rank 0 points ``latest`` at ``checkpoint`` (an absolute ``.../checkpoints/stepNNNNNNNN``):
    see ``crash_after_save/sitecustomize.py``. ``pythonpath``: the run's own, kept after the hook."""
    hook = Path(__file__).resolve().parent / "crash_after_save"
    return {
        "BIMAC_TEST_SIGKILL_AFTER_SAVE": str(checkpoint),
        "PYTHONPATH": f"{hook}{os.pathsep}{pythonpath}",
    }
