"""Fine-tuned image classification (BiMAC "Main Results"): a linear probe or full fine-tuning.

A linear head on BiMAC's L2-normalised global image embedding, trained with cross-entropy.
``mode: linear_probe`` freezes the whole BiMAC (only the head learns); ``mode: full`` trains the
image tower too. Data: an ImageFolder tree (``DIR/<class>/*.jpg``), WebDataset shards with a
``cls`` field (plus ``classnames``), or the embedded world's ``world:cls_shape:N[:SEED]``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bimac.data.loader import IndexLoader
from bimac.models.classifier import ImageClassifier
from bimac.tasks.finetune import FinetuneBase, FinetuneConfig, freeze

logger = logging.getLogger(__name__)


@dataclass
class ClassificationDataConfig:
    train: str = (
        "world:cls_shape:256:1"  # ImageFolder dir, shards with cls, world:SPLIT:N[:SEED][:VARIANT]
    )
    test: str = "world:cls_shape:64"
    classnames: str = ""  # file, one name per line in label order (required with shards)
    image_size: int = 64
    seed: int = 0


@dataclass
class ClassificationConfig(FinetuneConfig):
    """``configs/finetune/classification/*.yaml``."""

    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    mode: Literal["linear_probe", "full"] = "linear_probe"
    label_smoothing: float = 0.0
    eval_batch_size: int = 64


def load_items(spec: str, classnames_file: str = "") -> tuple[list[Any], list[int], list[str]]:
    """Image sources (bytes or paths), integer labels and class names of a dataset spec."""
    from bimac.data.samples import iter_samples, parse_world, world_options
    from bimac.eval.classification import image_folder, read_lines, shard_items

    names = read_lines(classnames_file) if classnames_file else None
    world = parse_world(spec)
    if world:
        from bimac.data.world import class_names

        images, labels = [], []
        for s in iter_samples(spec, seed=world_options(spec)[0] or 0):
            images.append(s["jpg"])
            labels.append(int(s["json"]["label_index"]))
        return images, labels, names or class_names(world[0], world_options(spec)[1])
    if Path(spec).is_dir():
        paths, labels, dirs = image_folder(spec)
        return paths, labels, names or [d.replace("_", " ") for d in dirs]
    if not names:
        raise ValueError(f"{spec}: shards need data.classnames (one class name per line)")
    images, labels = shard_items(spec)
    return images, labels, names


def image_batches(
    images: list[Any], labels: list[int], size: int, batch_size: int, order: list[int] | None = None
) -> Iterator[dict[str, Any]]:
    """``{"image": uint8 [B, 3, S, S], "label": int64 [B]}`` batches in ``order``."""
    from bimac.data.samples import image_chw

    order = list(range(len(images))) if order is None else order
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        yield {
            "image": torch.from_numpy(np.stack([image_chw(images[i], size) for i in idx])),
            "label": torch.tensor([labels[i] for i in idx], dtype=torch.long),
        }


@torch.no_grad()
def accuracy(
    model: ImageClassifier, images: list[Any], labels: list[int], size: int, batch_size: int = 64
) -> dict[str, float]:
    """Top-1 / top-5 / mean per-class recall (%) of a trained classifier."""
    from bimac.eval.classification import classification_metrics

    model.eval()
    logits = torch.cat(
        [model(b["image"]).float().cpu() for b in image_batches(images, labels, size, batch_size)]
    )
    return classification_metrics(logits, torch.tensor(labels))


class ClassificationTask(FinetuneBase):
    """Engine task: cross-entropy of the linear head on BiMAC image embeddings."""

    cfg: ClassificationConfig

    def __init__(self, cfg: ClassificationConfig) -> None:
        super().__init__(cfg)
        if cfg.data.image_size != self.model_config.image_size:
            raise ValueError(
                f"data.image_size={cfg.data.image_size} != the model's "
                f"{self.model_config.image_size}"
            )
        self.images, self.labels, self.classnames = load_items(cfg.data.train, cfg.data.classnames)
        logger.info(
            "classification: %d training images, %d classes", len(self.images), len(self.classnames)
        )

    def build_model(self) -> nn.Module:
        bimac = self.load_model()
        if self.cfg.mode == "linear_probe":
            freeze([bimac])
        else:  # the image embedding is all the head sees
            freeze([p for n, p in bimac.named_parameters() if not n.startswith("coca.visual.")])
        return ImageClassifier(bimac, len(self.classnames))

    def build_train_loader(
        self, rank: int, world_size: int, epoch: int, cursor: dict[int, int] | None
    ) -> IndexLoader:
        """A global order of the images (seeded by data.seed and the epoch), sliced by rank."""
        order = list(range(len(self.images)))
        random.Random(self.cfg.data.seed * 1000 + epoch).shuffle(order)
        size, train = self.cfg.data.image_size, self.cfg.train

        def batch(idx: list[int]) -> dict[str, Any]:
            return next(image_batches(self.images, self.labels, size, len(idx), idx))

        return IndexLoader(order, batch, train.global_batch_size, train.micro_batch_size, rank, world_size, cursor)  # fmt: skip

    def losses(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        logits = model(batch["image"])
        labels = batch["label"].to(logits.device)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        return {"classification": loss}, {
            "train_top1": float((logits.argmax(1) == labels).float().mean())
        }

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """A BiMAC export (so every ``bimac`` tool reads it) plus the head and class names."""
        super().export(model.bimac, out_dir)
        model.save_head(out_dir, self.classnames)
