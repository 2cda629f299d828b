"""Shard writing in img2dataset's layout, with webdataset's own ``ShardWriter``.

``NNNNN.tar`` holds ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` (+ ``KEY.syn.jpg``, ``KEY.en.txt``,
``KEY.bn.txt`` for triplets); ``NNNNN_stats.json`` beside each tar carries img2dataset's counters,
so ``sizes.json`` and ``shards.check`` treat our shards and real img2dataset output alike.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

log = logging.getLogger(__name__)


def write_shards(
    samples: Iterable[dict], out: str | Path, shard_size: int = 1000, total: int | None = None
) -> list[Path]:
    """Write ``samples`` (webdataset dicts with ``__key__``) to ``out/00000.tar``... + stats files.

    Keys may not contain dots: webdataset splits the file name at the first dot.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    state = {"start": time.time()}

    def post(fname: str) -> None:
        end = time.time()
        n = writer.count
        stats = {
            "count": n,
            "successes": n,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": end - state["start"],
            "start_time": state["start"],
            "end_time": end,
            "status_dict": {"success": n},
        }
        Path(fname[: -len(".tar")] + "_stats.json").write_text(json.dumps(stats, indent=2))
        written.append(Path(fname))
        state["start"] = end

    writer = wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, post=post, verbose=0)
    try:
        for sample in tqdm(samples, total=total, desc=f"writing {out}", unit="sample"):
            if "." in sample["__key__"]:
                raise ValueError(f"key {sample['__key__']!r} contains a dot")
            writer.write(sample)
    finally:
        writer.close()
    log.info("wrote %d shards to %s", len(written), out)
    return written
