"""A watchdog that ends a run which stopped making progress (a stalled collective or loader).

A rank waiting in a collective whose peer is stuck, or on a DataLoader whose worker hangs, waits
for ever (gloo's own timeout is 30 minutes and not always honoured); on a cluster that holds the
nodes until the allocation ends. The loop says where it is about to wait; when one such wait
lasts longer than ``train.watchdog_s``, this rank writes one line naming itself and the wait to
stderr and exits non-zero, so the launcher stops the other ranks and a batch system can requeue.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

EXIT_CODE = 3  # distinct from a Python error (1) so a log reader can tell a stall apart


class Watchdog:
    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self._where: str | None = None
        self._since = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bimac-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def waiting(self, where: str) -> Iterator[None]:
        """The code inside may block on other ranks or on the loader: watch it."""
        self._where, self._since = where, time.monotonic()
        try:
            yield
        finally:
            self._where = None

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            where, waited = self._where, time.monotonic() - self._since
            if where is not None and waited > self.timeout_s:
                sys.stderr.write(
                    f"rank {self.rank}: no progress for {waited:.0f} s while {where}; ending the "
                    f"run (exit {EXIT_CODE}) so it can be restarted from its last checkpoint. "
                    "If a step legitimately takes this long, raise train.watchdog_s\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_CODE)
