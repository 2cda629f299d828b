"""One run per run directory: ``<output_dir>/run.lock`` names the host and PID holding it.

When ``torchrun`` itself is killed its workers live on and keep saving; a restart into the same
directory would then train beside them, both moving ``checkpoints/latest``. Rank 0 creates the
lock file exclusively (``O_EXCL``, atomic on local and NFSv3+ filesystems); a lock left by a
process that no longer runs on this host is taken over with a log line. A lock held from another
host cannot be checked from here: it is refused, and the message says how to clear it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from bimac.config import UserError

logger = logging.getLogger(__name__)


class RunDirectoryLocked(UserError, RuntimeError):
    """Another live run holds this run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "run.lock"
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us may be re-taken by a racing start
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            return
        raise RunDirectoryLocked(f"could not take {self.path}: another run keeps re-creating it")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid = holder["host"], int(holder["pid"])
        except (OSError, ValueError, KeyError, TypeError):  # half-written or foreign: stale
            holder, host, pid = {}, self.me["host"], -1
        if host == self.me["host"] and (pid < 0 or not _alive(pid)):
            logger.warning(
                "taking over %s: its process %s on %s no longer runs", self.path, pid, host
            )
            self.path.unlink(missing_ok=True)
            return
        raise RunDirectoryLocked(
            f"{self.path.parent} is in use by process {pid} on {host} (since "
            f"{holder.get('since', '?')}): stop that run or choose another train.output_dir "
            f"(if that process is gone, delete {self.path})"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
