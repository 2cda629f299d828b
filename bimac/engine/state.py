"""The run state the loop carries from step to step, saved in every checkpoint's client state."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from bimac.config import UserError


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    epoch_steps: int = 0  # global steps done in this epoch (train.samples_per_epoch caps them)
    # the loader's cursor, {data stream: raw samples consumed this epoch}: this rank's streams
    # after a step, every rank's merged in a checkpoint (any world size resumes from it)
    data_cursor: dict[int, int] = field(default_factory=dict)
    total_samples: int = 0  # over every rank and epoch
    consecutive_nonfinite: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # skipped steps / samples by reason
    task_state: dict[str, Any] = field(default_factory=dict)  # the task's state_dict()

    def client_state(self, world: int, config_hash: str) -> dict[str, Any]:
        """What a checkpoint stores (collective: DeepSpeed writes rank 0's copy only, so every
        rank's data cursor is gathered and merged into it)."""
        cursors: list[Any] = [None] * world
        dist.all_gather_object(cursors, self.data_cursor)
        return {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_steps": self.epoch_steps,
            "data_cursor": {s: pos for c in cursors for s, pos in c.items()},
            "world_size": world,
            "total_samples": self.total_samples,
            "config_hash": config_hash,
            "skipped": dict(self.skipped),
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "task_state": self.task_state,
        }

    @classmethod
    def restore(cls, client_state: dict[str, Any]) -> RunState:
        """The state of a checkpoint, the same on every rank (the merged data cursor)."""
        if "data_cursor" not in client_state:
            raise UserError(
                "the checkpoint predates the world-size-independent data order (no data_cursor) "
                "and cannot resume it exactly: start fresh with train.resume=none or a new "
                "train.output_dir"
            )
        return cls(
            step=client_state["step"],
            epoch=client_state["epoch"],
            epoch_steps=client_state["epoch_steps"],
            data_cursor=dict(client_state["data_cursor"]),
            total_samples=client_state["total_samples"],
            consecutive_nonfinite=client_state["consecutive_nonfinite"],
            skipped=Counter(client_state["skipped"]),
            task_state=client_state.get("task_state", {}),
        )
