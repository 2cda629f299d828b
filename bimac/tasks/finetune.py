"""What the fine-tuning tasks share: starting model, tokenizer, shard loader, export.

A fine-tuning stage starts from a BiMAC export folder (``init``, :mod:`bimac.export_folder`) or, when ``init`` is empty, from a randomly
initialised BiMAC of the ``model`` section (CPU tests, or open_clip weights through
``model.pretrained``). Its export is again a BiMAC export directory, so stages chain.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from bimac import export_folder
from bimac.config import ConfigError
from bimac.data import SkipCounter, TokenizerConfig, build_tokenizer, make_loader
from bimac.engine import TrainConfig
from bimac.models.bimac import BiMAC, BiMACConfig, export_model_config

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """The sections every English fine-tuning stage's config starts with."""

    init: str = ""  # BiMAC export directory to start from; "" = a fresh `model`
    model: BiMACConfig = field(default_factory=BiMACConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def init_model_config(init: str, model: BiMACConfig) -> BiMACConfig:
    """The model config of the export ``init``, else ``model``."""
    return export_model_config(init, "init") if init else model


def init_tokenizer(init: str, tokenizer: TokenizerConfig, context_length: int) -> Any:
    """The tokenizer saved with the export ``init``, else the one ``tokenizer`` names."""
    if init:
        return export_folder.load_tokenizer(init, context_length)
    return build_tokenizer(dataclasses.replace(tokenizer, context_length=context_length))


def freeze(modules: Iterable[nn.Module | nn.Parameter]) -> None:
    """Stop gradients of parts no active objective uses (ZeRO expects every trainable grad)."""
    for part in modules:
        for p in part.parameters() if isinstance(part, nn.Module) else [part]:
            p.requires_grad_(False)


class FinetuneBase:
    """Engine-facing pieces every BiMAC fine-tuning task shares (docs/contracts.md "Task")."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.model_config = init_model_config(cfg.init, cfg.model)
        self.tokenizer = init_tokenizer(cfg.init, cfg.tokenizer, self.model_config.context_length)
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, the model "
                f"{self.model_config.vocab_size}"
            )
        self.counter = SkipCounter()

    def load_model(self) -> BiMAC:
        """BiMAC with the ``init`` weights (safetensors) or a fresh one."""
        if self.cfg.init:
            return BiMAC.from_pretrained(self.cfg.init)
        return BiMAC(self.model_config)

    def build_train_loader(
        self, rank: int, world_size: int, epoch: int, cursor: dict[int, int] | None
    ) -> Any:
        """The shard loader of ``cfg.data`` in micro-batches of ``train.micro_batch_size`` (a
        stage with other data overrides this)."""
        data = dataclasses.replace(self.cfg.data, batch_size=self.cfg.train.micro_batch_size)
        return make_loader(
            data, self.tokenizer, rank=rank, world_size=world_size, epoch=epoch,
            global_batch_size=self.cfg.train.global_batch_size, cursor=cursor,
            counter=self.counter,
        )  # fmt: skip

    def skipped_counts(self) -> dict[str, int]:
        return self.counter.as_dict()

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """A BiMAC export (model, experiment config with the model's real config, tokenizer)."""
        cfg = dataclasses.replace(self.cfg, init="", model=self.model_config)
        model.save_pretrained(out_dir, tokenizer=self._tokenizer_source(), experiment_config=cfg)

    def _tokenizer_source(self) -> Any:
        """The start export's tokenizer, else the world's ``tokenizer.json`` or the named one."""
        if self.cfg.init:
            return export_folder.tokenizer_source(self.cfg.init)
        tok = self.cfg.tokenizer
        return Path(tok.path) if tok.kind == "world" else tok.name
