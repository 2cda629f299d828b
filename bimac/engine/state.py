"""The run state the loop carries from step to step, saved in every checkpoint's client state."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_seen: int = 0  # this rank's samples drawn in this epoch: its loader's resume cursor
    total_samples: int = 0  # over every rank and epoch
    consecutive_nonfinite: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # skipped steps / samples by reason
    task_state: dict[str, Any] = field(default_factory=dict)  # the task's state_dict()

    def client_state(self, world: int, config_hash: str) -> dict[str, Any]:
        """What a checkpoint stores (collective: DeepSpeed writes rank 0's copy only, so every
        rank's cursor is gathered into it)."""
        cursors: list[Any] = [None] * world
        dist.all_gather_object(cursors, self.samples_seen)
        return {
            "step": self.step,
            "epoch": self.epoch,
            "samples_seen": cursors,
            "world_size": world,
            "total_samples": self.total_samples,
            "config_hash": config_hash,
            "skipped": dict(self.skipped),
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "task_state": self.task_state,
        }

    @classmethod
    def restore(cls, client_state: dict[str, Any], rank: int) -> RunState:
        return cls(
            step=client_state["step"],
            epoch=client_state["epoch"],
            samples_seen=client_state["samples_seen"][rank],
            total_samples=client_state["total_samples"],
            consecutive_nonfinite=client_state["consecutive_nonfinite"],
            skipped=Counter(client_state["skipped"]),
            task_state=client_state.get("task_state", {}),
        )
