"""Shared test isolation: in-process training runs must not leak a process group or its env."""

from __future__ import annotations

import os

import pytest

# what bimac.engine.distributed.export_env sets for a single local process
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """Tear down a process group a test left behind: a later fork would inherit it, and a later
    submitit job would inherit its MASTER_PORT (two concurrent cells then collide on the port)."""
    before = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
