"""Conceptual-Captions-style shards as img2dataset writes them, with world captions (whose shape
nouns the offline ``world`` spaCy pipeline tags), for the noun-tagging stage's tests."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from bimac.data.world import world_corpus
from bimac.data.writer import write_shards


def cc_captions(n: int) -> list[str]:
    """``n`` raw ``KEY.txt`` captions: world captions (shape nouns) with stray whitespace, one
    caption without a noun and one blank."""
    caps = [t for t in world_corpus(2 * n, seed=3) if t.isascii()][: n - 2]
    return [f"  {c}\n" if i % 3 == 0 else c for i, c in enumerate(caps)] + ["No noun at all.", "  "]


def cc_shards(out: Path, captions: list[str], shard_size: int = 4) -> None:
    """Shards in img2dataset's layout: ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` (its metadata)."""

    def samples():
        for i, caption in enumerate(captions):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (i * 9 % 256, 80, 200)).save(buf, format="JPEG")
            meta = {"url": f"http://x/{i}.jpg", "key": f"{i:09d}", "caption": caption,
                    "status": "success", "width": 40, "height": 30}  # fmt: skip
            yield {"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": caption, "json": meta}

    write_shards(samples(), out, shard_size=shard_size)
