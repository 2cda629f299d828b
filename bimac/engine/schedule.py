"""Learning-rate schedules: linear warm-up then cosine decay (BiMAC), one-cycle (PAL captioner)."""

from __future__ import annotations

import math

import torch

from bimac.engine.config import TrainConfig


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step``: 0 -> 1 linearly over the warm-up, then a
    half cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler DeepSpeed steps once per applied optimizer step."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=max(2, total_steps),
            pct_start=cfg.onecycle_pct_start,
            cycle_momentum=False,
        )
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio),
    )
