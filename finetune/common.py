"""What the English fine-tuning entry points share: config loading, logging, results files."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """``--config`` and ``key=value`` overrides, the same for every stage."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="experiment YAML (configs/finetune/...)")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="no training: evaluate the `init` export (default: train, then evaluate)",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.max_steps=20")
    return p


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
