"""What the fine-tuning tasks share: starting model, tokenizer, shard loader, export.

A fine-tuning stage starts from a BiMAC export directory (``init``: ``model.safetensors``,
``config.yaml``, tokenizer; see docs/contracts.md) or, when ``init`` is empty, from a randomly
initialised BiMAC of the ``model`` section (CPU tests, or open_clip weights through
``model.pretrained``). Its export is again a BiMAC export directory, so stages chain.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from bimac.config import ConfigError, from_dict
from bimac.data import DataConfig, SkipCounter, TokenizerConfig, build_tokenizer, make_loader
from bimac.models.bimac import CONFIG_FILE, BiMAC, BiMACConfig

logger = logging.getLogger(__name__)


def init_model_config(init: str, model: BiMACConfig) -> BiMACConfig:
    """The model config of the export ``init`` (its ``config.yaml``), else ``model``."""
    if not init:
        return model
    path = Path(init) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"init: {init!r} is not a BiMAC export directory (no {CONFIG_FILE})")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"{path}: no `model` section")
    return dataclasses.replace(from_dict(BiMACConfig, data["model"], "model."), pretrained=None)


def init_tokenizer(init: str, tokenizer: TokenizerConfig, context_length: int) -> Any:
    """The tokenizer saved with the export ``init``, else the one ``tokenizer`` names."""
    if init:
        from bimac.eval.common import load_tokenizer

        return load_tokenizer(Path(init), context_length)
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

    def shard_loader(
        self, data: DataConfig, rank: int, world_size: int, epoch: int, samples_seen: int
    ) -> Any:
        return make_loader(
            data, self.tokenizer, rank=rank, world_size=world_size, epoch=epoch,
            samples_seen=samples_seen, counter=self.counter,
        )  # fmt: skip

    def skipped_counts(self) -> dict[str, int]:
        return self.counter.as_dict()

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """A BiMAC export (model, experiment config with the model's real config, tokenizer)."""
        cfg = dataclasses.replace(self.cfg, init="", model=self.model_config)
        tok = self.tokenizer
        saver = getattr(getattr(tok, "tok", None), "save", None)
        model.save_pretrained(
            out_dir, tokenizer=None if saver else _tokenizer_name(self.cfg), experiment_config=cfg
        )
        if saver is not None:  # a tokenizers.Tokenizer (the world's): copy its file as is
            src = (
                Path(self.cfg.init) / "tokenizer.json"
                if self.cfg.init
                else Path(self.cfg.tokenizer.path)
            )
            if src.is_file():
                shutil.copyfile(src, Path(out_dir) / "tokenizer.json")
            else:
                tok.tok.save(str(Path(out_dir) / "tokenizer.json"))


def _tokenizer_name(cfg: Any) -> str:
    if cfg.init and (Path(cfg.init) / "tokenizer.txt").is_file():
        return (Path(cfg.init) / "tokenizer.txt").read_text().strip()
    return cfg.tokenizer.name
