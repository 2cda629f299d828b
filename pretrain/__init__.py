"""BiMAC pretraining entry point: ``python -m pretrain --config configs/pretrain/tiny.yaml k=v ...``.

The experiment config composes four sections plus the tokenizer: ``data`` (bimac.data.DataConfig),
``model`` (BiMACConfig), ``objectives`` (ObjectiveConfig), ``train`` (bimac.engine.TrainConfig),
``tokenizer`` (TokenizerConfig). A section may be a YAML path (relative to the file naming it) to
reuse ``configs/data/*.yaml`` / ``configs/model/*.yaml``, or a mapping with ``_base_: path`` plus
the keys it changes; file-level ``_base_`` chains work as everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bimac.config import ConfigError, load_config
from bimac.data import DataConfig, SkipCounter, TokenizerConfig, build_tokenizer, make_loader
from bimac.data.loader import check_spacy_pipeline
from bimac.engine import TrainConfig, TrainResult, train
from bimac.models.bimac import BiMACConfig
from bimac.tasks import ObjectiveConfig, PretrainTask

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: BiMACConfig = field(default_factory=BiMACConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    """Experiment YAML + ``section.key=value`` overrides -> a checked :class:`PretrainConfig`."""
    return check_consistency(load_config(PretrainConfig, path, overrides))


def check_consistency(cfg: PretrainConfig) -> PretrainConfig:
    """Cross-section rules; the loader's batch is the engine's micro-batch, and RF makes the loader
    add every caption of an image as its reward references."""
    m, d, t = cfg.model, cfg.data, cfg.tokenizer
    if m.image_size != d.image_size:
        raise ConfigError(f"model.image_size={m.image_size} != data.image_size={d.image_size}")
    if m.context_length != t.context_length:
        raise ConfigError(
            f"model.context_length={m.context_length} != tokenizer.context_length={t.context_length}"
        )
    if cfg.objectives.rf and not d.references:
        logger.info(
            "data.references := true (objectives.rf scores against all of an image's captions)"
        )
        d = dataclasses.replace(d, references=True)
        cfg = dataclasses.replace(cfg, data=d)
    if d.batch_size != cfg.train.micro_batch_size:
        logger.info("data.batch_size := train.micro_batch_size = %d", cfg.train.micro_batch_size)
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(d, batch_size=cfg.train.micro_batch_size)
        )
    return cfg


class BiMACPretrain(PretrainTask):
    """The pretraining task bound to the data pipeline: loader, skip counts and export."""

    def __init__(self, cfg: PretrainConfig) -> None:
        check_spacy_pipeline(cfg.data)  # at start-up, before DeepSpeed takes the devices
        tokenizer = build_tokenizer(cfg.tokenizer)
        if tokenizer.vocab_size > cfg.model.vocab_size or tokenizer.pad_id != cfg.model.pad_id:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} / model.pad_id={cfg.model.pad_id} do not "
                f"cover the tokenizer (vocab {tokenizer.vocab_size}, pad {tokenizer.pad_id})"
            )
        self.cfg = cfg
        self.counter = SkipCounter()
        super().__init__(
            cfg.model, cfg.objectives, loader_factory=self._loader, tokenizer=tokenizer
        )

    def _loader(self, rank: int, world_size: int, epoch: int, samples_seen: int):
        return make_loader(
            self.cfg.data, self.tokenizer, rank=rank, world_size=world_size, epoch=epoch,
            samples_seen=samples_seen, counter=self.counter,
        )  # fmt: skip

    def skipped_counts(self) -> dict[str, int]:
        return self.counter.as_dict()

    def export(self, model: Any, out_dir: Path) -> None:
        tok = self.cfg.tokenizer
        name = None if tok.kind == "world" else tok.name
        model.save_pretrained(out_dir, tokenizer=name, experiment_config=self.cfg)
        if tok.kind == "world":
            shutil.copyfile(tok.path, Path(out_dir) / "tokenizer.json")


def run_pretraining(config: PretrainConfig | str | Path, overrides: list[str] = ()) -> TrainResult:
    """Pretrain (or resume) BiMAC; call on every rank (torchrun / srun / one local process)."""
    cfg = config if isinstance(config, PretrainConfig) else load_pretrain_config(config, overrides)
    if isinstance(config, PretrainConfig) and overrides:
        raise ValueError("overrides apply to a config file; edit the PretrainConfig instead")
    return train(BiMACPretrain(cfg), cfg.train, experiment_config=cfg)


def launch_local(
    config: str | Path, overrides: list[str] = (), nproc: int = 2, env: dict[str, str] | None = None
) -> int:
    """Pretrain on this machine with ``nproc`` processes (torchrun); returns the exit code.

    Without CUDA it uses DeepSpeed's CPU accelerator and gloo (what ``make demo`` runs:
    ``launch_local("configs/pretrain/tiny.yaml", nproc=2)``; ZeRO-2 is the tiny config's stage).
    """
    import torch

    run_env = {**os.environ, **(env or {})}
    if not torch.cuda.is_available():
        run_env.setdefault("DS_ACCELERATOR", "cpu")
        run_env.setdefault("OMP_NUM_THREADS", "1")
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), run_env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "pretrain", "--config", str(config), *overrides]  # fmt: skip
    return subprocess.run(cmd, env=run_env, cwd=REPO).returncode
