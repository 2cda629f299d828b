"""The one training loop (DeepSpeed ZeRO), its config, checkpoints, logging and preemption."""

from __future__ import annotations

from bimac.engine.checkpoint import CheckpointSaveError
from bimac.engine.config import TrainConfig, derive_accumulation
from bimac.engine.loop import NonFiniteTrainingError, Task, TrainResult, train
from bimac.engine.run_lock import RunDirectoryLocked

__all__ = [
    "CheckpointSaveError",
    "RunDirectoryLocked",
    "NonFiniteTrainingError",
    "Task",
    "TrainConfig",
    "TrainResult",
    "derive_accumulation",
    "train",
]
