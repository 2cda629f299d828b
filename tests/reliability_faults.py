"""Fault builders for the reliability tests: broken samples, broken shards, hostile pickles.

Each sample fault takes a good embedded-world sample (``bimac.data.world.make_sample``) and
returns a broken copy; ``SAMPLE_FAULTS`` maps its name to the skip reason the loader must count
(``None``: the sample is valid and must be used, e.g. a PNG stored under ``.jpg``).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import webdataset as wds
from PIL import Image

from bimac.data.world import make_sample

BOMB_SIDE = 10_000  # 100 megapixels: above PIL's MAX_IMAGE_PIXELS (89.5 M), below its hard 2x


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A ~100-byte PNG whose header claims ``side x side`` RGB pixels (300 MB once decoded)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (3 * side + 1))  # one real row; the decoder would want them all
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def png_bytes(jpg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).save(buf, format="PNG")
    return buf.getvalue()


def _no_json_captions(s: dict) -> dict:
    # world samples carry their captions in the json too, which would replace `txt`
    return s | {"json": b"{}"}


SAMPLE_FAULTS: dict[str, tuple[Callable[[dict], dict], str | None]] = {
    "truncated_jpeg": (lambda s: s | {"jpg": s["jpg"][: len(s["jpg"]) // 2]}, "bad_image"),
    "zero_byte_image": (lambda s: s | {"jpg": b""}, "bad_image"),
    "png_named_jpg": (lambda s: s | {"jpg": png_bytes(s["jpg"])}, None),
    "decompression_bomb": (lambda s: s | {"jpg": decompression_bomb_png()}, "image_too_large"),
    "empty_caption": (lambda s: _no_json_captions(s) | {"txt": b""}, "empty_caption"),
    "non_utf8_caption": (
        lambda s: _no_json_captions(s) | {"txt": b"a \xff\xfe caption"},
        "bad_caption_encoding",
    ),
    "caption_10000_words": (
        lambda s: _no_json_captions(s) | {"txt": " ".join(["circle"] * 10_000).encode()},
        None,
    ),
    "invalid_json": (lambda s: s | {"json": b'{"captions_en": ['}, "bad_json"),
}


def encoded(sample: dict) -> dict:
    """A ``make_sample`` dict with every member as bytes (``__key__`` stays a string)."""
    out = {}
    for k, v in sample.items():
        if isinstance(v, dict):
            v = json.dumps(v).encode()
        out[k] = v.encode() if isinstance(v, str) and not k.startswith("_") else v
    return out


def write_faulty_shards(
    out: Path, n: int = 400, shard_size: int = 100, rate: float = 0.01, seed: int = 0
) -> tuple[str, Counter[str], int]:
    """``n`` world samples in shards of ``shard_size``, a fraction ``rate`` of them broken by each
    fault of ``SAMPLE_FAULTS`` (spread evenly over the shards). Returns the brace pattern, the
    skips expected by reason, and the number of samples that must come out."""
    out.mkdir(parents=True, exist_ok=True)
    per_fault = max(1, round(n * rate))
    names = list(SAMPLE_FAULTS)
    stride = n // (per_fault * len(names))
    plan = {i * stride: names[i % len(names)] for i in range(per_fault * len(names))}
    expected: Counter[str] = Counter()
    shards = (n + shard_size - 1) // shard_size
    for s in range(shards):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
            for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
                sample = encoded(make_sample(seed, "train", i))
                if i in plan:
                    breaker, reason = SAMPLE_FAULTS[plan[i]]
                    sample = breaker(sample)
                    if reason:
                        expected[reason] += 1
                w.write(sample)
    good = n - sum(expected.values())
    return str(out / f"{{00000..{shards - 1:05d}}}.tar"), expected, good


def truncate_shard(path: Path, keep: float = 0.5) -> None:
    """Cut a shard mid-member (``keep`` of its bytes, not on a 512-byte block boundary)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) // 512 * 512 + 100])


class PickledPayload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
