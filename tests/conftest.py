"""Shared test isolation: in-process training runs must not leak their distributed env."""

from __future__ import annotations

import os

import pytest

# what bimac.engine.distributed.export_env sets for a single local process
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_dist_env():
    """Restore the variables a test's in-process training set: a later submitit job would inherit
    MASTER_PORT, and two concurrent cells would then collide on the port. (The process group
    itself stays: DeepSpeed caches groups made from it, and later in-process runs reuse it.)"""
    before = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
