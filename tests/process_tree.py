"""Simulate a crash: SIGKILL a launched command and every process under it."""

from __future__ import annotations

import contextlib
import signal


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts each worker in its own
    session and multiprocessing pools fork children, so a process group does not reach them all)."""
    import psutil

    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
