"""A BiMAC image classifier: a linear head on the L2-normalised image embedding, saved beside a
BiMAC export (``classifier.safetensors``, ``classnames.txt``) so every tool still reads the export."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bimac.models.bimac import BiMAC

HEAD_FILE = "classifier.safetensors"
CLASSES_FILE = "classnames.txt"


class ImageClassifier(nn.Module):
    """BiMAC's normalised image embedding -> linear class logits."""

    def __init__(self, bimac: BiMAC, num_classes: int) -> None:
        super().__init__()
        self.bimac = bimac
        self.head = nn.Linear(bimac.config.embed_dim, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.bimac.encode_image(image))

    def save_head(self, directory: str | Path, classnames: list[str]) -> None:
        """``classifier.safetensors`` and ``classnames.txt`` beside a BiMAC export."""
        head = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(head, str(Path(directory) / HEAD_FILE))
        (Path(directory) / CLASSES_FILE).write_text("\n".join(classnames) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> tuple[ImageClassifier, list[str]]:
        directory = Path(directory)
        names = (directory / CLASSES_FILE).read_text().splitlines()
        model = cls(BiMAC.from_pretrained(directory), len(names))
        model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
        return model, names
