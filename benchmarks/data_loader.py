"""Images/s of the training data pipeline vs the bare PIL decode+resize loop (per-core ceiling).

Same shards, one run: the embedded world rendered at ``--src`` px (JPEG), read through
``bimac.data.make_loader`` (tar reading, checks, decode, resize + centre crop to ``--size``,
tokenise, noun spans, uint8 collate) with 0, 1 and 2 DataLoader workers, beside a single-process
loop doing only PIL's decode + resize + crop on the same JPEG bytes held in memory.
Prints a markdown table. ``.venv/bin/python benchmarks/data_loader.py [--n 3000]``
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
from shards.synthetic import build


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the DataLoader workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def ceiling(jpegs: list[bytes], size: int) -> tuple[float, float]:
    """Images per wall second and per CPU second of PIL decode (draft) + shortest-side bicubic
    resize + centre crop, one process."""
    t, c = time.perf_counter(), _cpu()
    for data in jpegs:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
        w, h = img.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        np.asarray(img.crop((left, top, left + size, top + size)))
    return len(jpegs) / (time.perf_counter() - t), len(jpegs) / (_cpu() - c)


def pipeline(cfg: DataConfig, tok, workers: int) -> tuple[float, float, int]:
    """Images per wall second and per CPU second (all processes) over one epoch, start-up included."""
    t, c = time.perf_counter(), _cpu()
    n = sum(
        len(b["sample_id"])
        for b in make_loader(cfg, tok, rank=0, world_size=1, num_workers=workers)
    )
    return n / (time.perf_counter() - t), n / (_cpu() - c), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=3000, help="images")
    p.add_argument("--src", type=int, default=256, help="stored image side")
    p.add_argument("--size", type=int, default=224, help="tower input side")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tars = build(Path(d), "train", a.n, a.src, seed=0, shard_size=500)
        jpegs = []
        for t in tars:
            with tarfile.open(t) as tf:
                jpegs += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
        tok = build_tokenizer(
            TokenizerConfig(path=str(Path(d) / "tokenizer.json"), context_length=32)
        )
        cfg = DataConfig(
            train_shards=f"{d}/*.tar", image_size=a.size, batch_size=64, shuffle_buffer=1000
        )
        ceil, ceil_cpu = max(ceiling(jpegs, a.size) for _ in range(a.repeats))
        rows = []
        for w in (0, 1, 2):
            rate, cpu_rate, n = max(pipeline(cfg, tok, w) for _ in range(a.repeats))
            assert n == a.n, (n, a.n)
            rows.append((w, rate, rate / (ceil * max(w, 1)), cpu_rate, cpu_rate / ceil_cpu))
    load = os.getloadavg()[0]
    print(f"\n{a.n} world images, {a.src} px JPEG -> uint8 {a.size} px, batch 64, best of "
          f"{a.repeats}; {os.cpu_count()} CPUs, load average {load:.1f}\n")  # fmt: skip
    print("| pipeline | images/s (wall) | ratio to ceiling per worker | images per CPU-s | ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| bare PIL decode+resize loop (ceiling) | {ceil:.0f} | 1.00 | {ceil_cpu:.0f} | 1.00 |")
    for w, rate, ratio, cpu_rate, cpu_ratio in rows:
        print(
            f"| bimac.data loader, {w} workers | {rate:.0f} | {ratio:.2f} | {cpu_rate:.0f} | {cpu_ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
