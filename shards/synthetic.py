"""Build embedded-world shards: ``python -m shards.synthetic --out DIR --split train --n N``.

Writes ``DIR/00000.tar``... in img2dataset's layout (``--triplets`` adds the synthetic companion
and the EN/BN caption files) and the world tokenizer ``DIR/tokenizer.json``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from bimac.data.synthetic import SPLITS, make_sample
from bimac.data.tokenizer import save_world_tokenizer
from bimac.data.writer import write_shards


def build(
    out: str | Path,
    split: str = "train",
    n: int = 1000,
    size: int = 64,
    seed: int = 0,
    triplets: bool = False,
    shard_size: int = 1000,
) -> list[Path]:
    """Render ``n`` samples of ``split`` into shards under ``out``; returns the tar paths."""
    if split == "probe" and n % 2:
        raise ValueError("the probe split comes in pairs: --n must be even")
    samples = (make_sample(seed, split, i, size, triplets) for i in range(n))
    tars = write_shards(samples, out, shard_size=shard_size, total=n)
    save_world_tokenizer(Path(out) / "tokenizer.json")
    return tars


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--n", type=int, default=1000, help="samples (probe: 2 per pair)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--triplets", action="store_true", help="add KEY.syn.jpg, KEY.en.txt, KEY.bn.txt"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build(a.out, a.split, a.n, a.size, a.seed, a.triplets, a.shard_size)


if __name__ == "__main__":
    main()
