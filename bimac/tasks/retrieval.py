"""Contrastive fine-tuning for image-text retrieval (BiMAC "Main Results", COCO / Flickr30k).

Only the contrastive objective (Eqs. 3-5, :func:`contrastive_loss`) trains; the caption decoder,
patch decoder and grounding heads are frozen, as they receive no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bimac.data import DataConfig
from bimac.losses import contrastive_loss
from bimac.tasks.finetune import FinetuneBase, FinetuneConfig, freeze


@dataclass
class RetrievalEvalConfig:
    """Where R@1/5/10 are measured before and after fine-tuning (``bimac.eval.retrieval``)."""

    data: str = "world:retrieval:64"  # shards, world:retrieval:N, or a Karpathy JSON
    images: str = ""  # image folder for a Karpathy JSON
    split: str = "test"
    limit: int = 0  # 0 = all images
    batch_size: int = 64
    enabled: bool = True


@dataclass
class RetrievalConfig(FinetuneConfig):
    """``configs/finetune/retrieval/*.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    temperature: float | None = None  # fixed τ; null = the model's learnable logit scale
    eval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 or null, got {self.temperature}")


class RetrievalTask(FinetuneBase):
    """Engine task: symmetric InfoNCE over the micro-batch's image-text pairs."""

    cfg: RetrievalConfig

    def build_model(self) -> nn.Module:
        model = self.load_model()
        unused: list[Any] = [
            model.coca.text_decoder,
            model.patch_decoder,
            *model.grounding_parts(),
        ]
        if self.cfg.temperature is not None:
            unused.append(model.coca.logit_scale)
        freeze(unused)
        return model

    def losses(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        out = model(
            batch["image"], batch["text"], caption=False, grounding=False, reconstruction=False
        )
        t = self.cfg.temperature
        scale = out["logit_scale"].clamp(max=100) if t is None else 1.0 / t
        loss = contrastive_loss(out["image_features"], out["text_features"], scale)
        return {"contrastive": loss}, {
            "logit_scale": float(scale.detach() if torch.is_tensor(scale) else scale)
        }
