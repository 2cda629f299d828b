"""Validate a shard set: ``python -m shards.check 'DIR/{00000..00009}.tar' [--triplets]``.

A directory stands for every ``*.tar`` in it.

Reads every sample through the trainer's own pipeline (``bimac.data.loader``: tar reading,
checks, decoding, resizing) and prints a JSON summary: samples read, samples skipped by reason,
shards, caption length statistics. Exits 1 when nothing could be read.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from bimac.config import CliParser, ConfigError, program, run_main
from bimac.data.loader import DataConfig, ShardDataset, require_shards


def shard_pattern(urls: str) -> str:
    """``urls``, or the ``*.tar`` files of the directory ``urls``; a ConfigError when it names no
    shard (checked here: the loader would report an empty set as zero samples)."""
    if Path(urls).is_dir():
        tars = sorted(Path(urls).glob("*.tar"))
        if not tars:
            raise ConfigError(f"urls: directory {urls} holds no .tar shard; give a shard pattern")
        urls = "::".join(map(str, tars))
    require_shards(urls, "urls")
    return urls


def check(urls: str, triplets: bool = False, image_size: int = 64) -> dict:
    """Summary of the shard set ``urls`` (pattern as in ``DataConfig.train_shards``, or a
    directory of shards)."""
    urls = shard_pattern(urls)
    cfg = DataConfig(
        train_shards=urls,
        kind="triplets" if triplets else "pairs",
        random_caption=False,
        image_size=image_size,
        shuffle_buffer=0,
        noun_source="none",
    )
    ds = ShardDataset(cfg, tokenizer=None, rank=0, world_size=1)
    chars: list[int] = []
    words: list[int] = []
    ids: set[str] = set()
    duplicates = 0
    for raw in tqdm(ds.raw_samples(), desc="checking", unit="sample"):
        item = ds.decode(raw)
        if item is None:
            continue
        duplicates += item["sample_id"] in ids
        ids.add(item["sample_id"])
        chars.append(len(item["text"]))
        words.append(len(item["text"].split()))

    def stats(xs: list[int]) -> dict:
        if not xs:
            return {}
        return {"min": min(xs), "mean": round(statistics.fmean(xs), 2), "max": max(xs)}

    return {
        "shards": len(ds.urls),
        "samples": len(chars),
        "skipped": ds.counter.as_dict(),
        "skipped_total": sum(ds.counter.as_dict().values()),
        "duplicate_ids": duplicates,
        "caption_chars": stats(chars),
        "caption_words": stats(words),
    }


PROG = "python -m shards.check"


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog=program(PROG), description=__doc__)
    p.add_argument("urls", help="shard pattern (brace, glob, a::b lists, pipe:) or a directory")
    p.add_argument("--triplets", action="store_true", help="check triplet members too")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = p.parse_args(argv)
    summary = check(a.urls, a.triplets)
    print(json.dumps(summary, indent=2))
    if summary["samples"] == 0:
        raise ConfigError(f"urls: no sample of {a.urls} could be read; see `skipped` above")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
