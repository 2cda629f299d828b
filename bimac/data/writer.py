"""Shard writing in img2dataset's layout, with webdataset's own ``ShardWriter``.

``NNNNN.tar`` holds ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` (+ ``KEY.syn.jpg``, ``KEY.en.txt``,
``KEY.bn.txt`` for triplets); ``NNNNN_stats.json`` beside each tar carries img2dataset's counters,
so ``sizes.json`` and ``shards.check`` treat our shards and real img2dataset output alike.

The same samples give the same bytes (tar members carry a fixed mtime, owner and mode; the stats
hold counts, not wall-clock times), and each file appears complete or not at all (written under a
temporary name, then renamed), so a killed builder rerun with the same command leaves exactly what
an uninterrupted run does.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

log = logging.getLogger(__name__)

#: mtime of every tar member: a fixed time, so that a rebuild gives the same bytes
TAR_MTIME = 0.0


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place. Named after ``path`` alone, so a
    rerun after a kill writes (and renames away) the same file rather than leaving a stray one."""
    return path.with_name(f".{path.name}.partial")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete."""
    tmp = partial_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shards(
    samples: Iterable[dict], out: str | Path, shard_size: int = 1000, total: int | None = None
) -> list[Path]:
    """Write ``samples`` (webdataset dicts with ``__key__``) to ``out/00000.tar``... + stats files.

    Keys may not contain dots: webdataset splits the file name at the first dot.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    open_file: dict[str, object] = {}

    def opener(fname: str):
        # closed in ``post``, once ShardWriter has finished the tar
        open_file["f"] = f = open(partial_path(Path(fname)), "wb")  # noqa: SIM115
        return f

    def post(fname: str) -> None:
        f = open_file.pop("f")
        f.flush()
        os.fsync(f.fileno())
        f.close()
        n = writer.count
        stats = {
            "count": n,
            "successes": n,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": n},
        }
        os.replace(partial_path(Path(fname)), fname)
        atomic_write(
            Path(fname[: -len(".tar")] + "_stats.json"), json.dumps(stats, indent=2).encode()
        )
        written.append(Path(fname))

    writer = wds.ShardWriter(
        str(out / "%05d.tar"),
        maxcount=shard_size,
        post=post,
        verbose=0,
        opener=opener,
        mtime=TAR_MTIME,
    )
    try:
        for sample in tqdm(samples, total=total, desc=f"writing {out}", unit="sample"):
            if "." in sample["__key__"]:
                raise ValueError(f"key {sample['__key__']!r} contains a dot")
            writer.write(sample)
    finally:
        writer.close()
    log.info("wrote %d shards to %s", len(written), out)
    return written
