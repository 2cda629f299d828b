"""Stage 1: COCO English captions -> Bengali with MarianMT (PAL §4.2.1).

``python -m shards.bengali.translate --captions captions_train2014.json --out work/translated
[--shard-index $SLURM_ARRAY_TASK_ID] [model=PATH] [batch_size=128] [num_shards=10]``

Writes ``shard_NNNNN.csv`` (``caption_id, image_id, en, bn``) per shard, ``.rejects.csv`` with
the captions dropped and why (empty, too long, model error) and ``.summary.json`` with the counts.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bimac.config import ConfigError, parse_cli, run_main
from shards.bengali.resumable import (
    ShardRun,
    pending_shards,
    require_input,
    setup_logging,
    shard_bounds,
)

log = logging.getLogger(__name__)

FIELDS = ["caption_id", "image_id", "en", "bn"]


@dataclass
class TranslateConfig:
    captions: Path | None = None  # COCO caption JSON (``annotations``: id, image_id, caption)
    out: Path = Path("work/bengali/translated")
    model: str = "Helsinki-NLP/opus-mt-en-bn"  # hub name or local path
    batch_size: int = 128
    num_shards: int = 10
    shard_index: int | None = None  # None: all shards (or SLURM_ARRAY_TASK_ID when set)
    max_source_tokens: int = 128  # a longer caption is rejected as "too_long"
    max_new_tokens: int = 256
    num_beams: int | None = None  # None: the model's generation config
    device: str = "auto"


def load_coco_captions(path: Path) -> list[dict[str, Any]]:
    """``[{caption_id, image_id, en}]`` in file order from a COCO caption JSON."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    anns = data["annotations"] if isinstance(data, dict) else data
    return [
        {
            "caption_id": a["id"],
            "image_id": a["image_id"],
            "en": " ".join(str(a["caption"]).split()),
        }
        for a in anns
    ]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class MarianTranslator:
    """English -> Bengali with a seq2seq translation model (hub name or path)."""

    def __init__(self, cfg: TranslateConfig):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSeq2SeqLM.from_pretrained(cfg.model, dtype=dtype)
        self.model.to(self.device).eval()

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, verbose=False).input_ids)

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[str]:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": self.cfg.max_new_tokens}
        if self.cfg.num_beams is not None:
            kwargs["num_beams"] = self.cfg.num_beams
        out = self.model.generate(**enc, **kwargs)
        return [
            " ".join(t.split()) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)
        ]


def translate_shard(
    rows: list[dict[str, Any]],
    translate: Callable[[list[str]], list[str]],
    n_tokens: Callable[[str], int],
    cfg: TranslateConfig,
    index: int,
) -> dict[str, Any]:
    """Translate shard ``index`` of ``rows`` (all captions); return its summary."""
    start, end = shard_bounds(len(rows), cfg.num_shards, index)

    def check(item: dict[str, Any]) -> str | None:
        if not item["en"].strip():
            return "empty"
        if n_tokens(item["en"]) > cfg.max_source_tokens:
            return "too_long"
        return None

    def process(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        bn = translate([it["en"] for it in items])
        return [{**it, "bn": b} for it, b in zip(items, bn)]

    run = ShardRun(cfg.out, "translate", index, FIELDS)
    return run.run(rows[start:end], cfg.batch_size, check, process)


PROG = "python -m shards.bengali.translate"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    setup_logging()
    cfg = parse_cli(TranslateConfig, PROG, __doc__, argv, "stage YAML (configs/bengali/*.yaml)")
    if cfg.captions is None:
        raise ConfigError("captions: give the COCO caption JSON with --captions FILE")
    require_input(cfg.captions, "captions", "give the COCO caption JSON (captions_train2014.json)")
    todo = pending_shards(cfg.out, "translate", range(cfg.num_shards), cfg.shard_index, FIELDS)
    if not todo:
        return []
    rows = load_coco_captions(cfg.captions)
    translator = MarianTranslator(cfg)
    return [translate_shard(rows, translator, translator.n_tokens, cfg, i) for i in todo]


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
