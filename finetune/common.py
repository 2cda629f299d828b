"""What the fine-tuning entry points share: command line, start-up checks, logging, results."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bimac import export_folder
from bimac.config import config_parser, load_config, program
from bimac.data import DataConfig
from bimac.data.loader import require_shards


def parser(cls: type, prog: str, doc: str) -> argparse.ArgumentParser:
    """The shared convention (:func:`bimac.config.config_parser`) plus ``--eval-only``."""
    p = config_parser(cls, program(prog), doc, config_help="experiment YAML (configs/finetune/...)")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="no training: evaluate the `init` export (default: train, then evaluate)",
    )
    return p


def stage_main(
    cls: type, prog: str, doc: str, run: Callable[[Any, bool], dict], argv: list[str] | None
) -> dict:
    """The ``main`` of an English stage: command line, config, input checks, then ``run``."""
    args = parser(cls, prog, doc).parse_args(argv)
    setup_logging()
    cfg = load_config(cls, args.config, args.overrides)
    check_inputs(cfg)
    return run(cfg, args.eval_only)


def check_inputs(cfg: Any) -> None:
    """What a stage reads, checked before the engine (DeepSpeed, wandb, workers) starts: the
    ``init`` export folder and the training shards."""
    if getattr(cfg, "init", ""):
        export_folder.check(cfg.init, "init")
    data = getattr(cfg, "data", None)
    if isinstance(data, DataConfig):
        require_shards(data.train_shards, "data.train_shards")


def setup_logging() -> int:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    return rank


def bimac_encoder_of(model: Any, tokenizer: Any, name: str) -> Any:
    """A :class:`bimac.eval.common.Encoder` over an in-memory BiMAC (CPU, eval mode)."""
    from bimac.eval.common import Encoder

    model = model.eval()
    return Encoder(
        images=lambda x: model.encode_image(x).float(),
        texts=lambda t: model.encode_text(tokenizer.encode(list(t))).float(),
        image_size=model.config.image_size,
        name=name,
        model=model,
        tokenizer=tokenizer,
    )


def fresh_model(task: Any, seed: int) -> Any:
    """The model the engine will start from (same seed), for the "before" numbers."""
    torch.manual_seed(seed)
    return task.build_model()


def write_results(out_dir: Path, name: str, results: dict) -> Path:
    """``out_dir/eval_<name>.json`` (what ``bimac report`` gathers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"eval_{name}.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    logging.getLogger(__name__).info("wrote %s", path)
    return path
