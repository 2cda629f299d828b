"""Settings of the one training loop (pretraining and every fine-tuning stage)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bimac.config import ConfigError


@dataclass
class TrainConfig:
    """The ``train`` section of an experiment config.

    The global batch is the target: ``micro_batch_size x accumulation x world_size`` must equal
    ``global_batch_size``; the accumulation is derived (see :func:`derive_accumulation`).
    """

    output_dir: Path = Path("runs/tiny")
    seed: int = 0
    global_batch_size: int = 8
    micro_batch_size: int = 4
    epochs: int = 1
    # 0 = the loader decides when an epoch ends; streams (WebDataset) need a number here.
    samples_per_epoch: int = 0
    # 0 = no cap; otherwise the run ends after this many optimizer steps (also sizes the schedule).
    max_steps: int = 0

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    onecycle_pct_start: float = 0.3
    grad_clip: float = 1.0

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[1, 2, 3] = 2
    # Extra DeepSpeed settings (e.g. configs/deepspeed/zero2.json); batch, precision, clipping
    # and stage always come from this config. Relative paths resolve against the repository.
    deepspeed_config: Path | None = None
    activation_checkpointing: bool = False

    max_consecutive_nonfinite: int = 5
    # seconds a rank may wait on the loader or on other ranks (a collective, a save) before the
    # run ends with an error naming the rank and the wait; longer than the slowest step. 0 = off.
    watchdog_s: float = 600.0

    log_every: int = 10
    # write sample_ids.jsonl: the sample keys of every global step in global order (which data a
    # step saw; compare runs on different world sizes or after a resume)
    log_sample_ids: bool = False
    progress_bar: bool = True
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "bimac"
    run_name: str = ""

    save_every_steps: int = 0  # 0 = only at the end and on preemption
    keep_last: int = 3
    # "auto": continue from output_dir/checkpoints/latest when it exists; "none": start fresh;
    # otherwise a checkpoint tag directory to start from.
    resume: str = "auto"
    export_at_end: bool = True
    requeue_on_preemption: bool = True


def derive_accumulation(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient-accumulation steps that turn ``micro x world`` into the global batch."""
    per_step = micro_batch_size * world_size
    if micro_batch_size <= 0 or global_batch_size <= 0 or global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} is not a multiple of "
            f"train.micro_batch_size={micro_batch_size} x world_size={world_size} = {per_step}; "
            "change one of them so the global batch divides"
        )
    return global_batch_size // per_step
