"""Photo benchmark shards: ``python -m shards.photos --out DIR --n 3000 --size 1024x768``.

Real photographs that installed packages ship (matplotlib's Grace Hopper portrait; scikit-learn's
``china.jpg`` and ``flower.jpg``; scikit-image's colour photographs when it is installed) are
cropped, scaled, flipped and colour-jittered into ``n`` distinct JPEGs (q90, 4:2:0, baseline) at
the sizes img2dataset produces (~500x375) and CC images come in (~1024x768). Images wider than
half the requested size of the largest source are 2x2 mosaics of native-resolution crops, so no
pixel is upsampled and the JPEG carries a photograph's detail, not a blur. Each sample carries the
caption and JSON of the embedded world's sample with the same index (boxes scaled to the photo),
so tokenising, noun spans and JSON cost what they cost on world shards.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import multiprocessing
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bimac.config import ConfigError, parse_cli, run_main
from bimac.data.tokenizer import save_world_tokenizer
from bimac.data.world import make_sample
from bimac.data.writer import write_shards

# (package, path inside it): real colour photographs shipped in the package's wheel
SOURCES = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
)
WORLD_SIDE = 64  # the world sample whose caption/JSON a photo borrows is rendered this small


def source_photos() -> dict[str, np.ndarray]:
    """``{package/file: RGB uint8 array}`` of every source photograph that is installed."""
    photos = {}
    for package, rel in SOURCES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(spec.submodule_search_locations[0]) / rel
        if path.is_file():
            photos[f"{package}/{path.name}"] = np.asarray(Image.open(path).convert("RGB"))
    if not photos:
        raise FileNotFoundError("no source photograph found (matplotlib's sample data is missing)")
    return photos


def _crop(src: np.ndarray, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A ``w`` x ``h`` crop of ``src`` scaled down by a random factor (up only where ``src`` is
    smaller than the crop), flipped and colour-jittered."""
    sh, sw = src.shape[:2]
    fit = min(sw / w, sh / h)  # source pixels per target pixel of the largest window
    scale = rng.uniform(min(1.0, fit), fit)
    cw, ch = min(sw, round(w * scale)), min(sh, round(h * scale))
    x, y = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    img = Image.fromarray(src[y : y + ch, x : x + cw]).resize((w, h), Image.LANCZOS)
    out = np.asarray(img, np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    gain = rng.uniform(0.8, 1.2, 3) * rng.uniform(0.85, 1.15)
    out = 255.0 * (out / 255.0) ** rng.uniform(0.8, 1.25) * gain
    return np.clip(out, 0, 255).astype(np.uint8)


def make_photo(photos: list[np.ndarray], w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """One photo-like image: a single crop, or a 2x2 mosaic when one source crop would need
    upsampling to fill ``w`` x ``h``."""
    if all(min(p.shape[1] / w, p.shape[0] / h) < 1 for p in photos):
        tw, th = w // 2, h // 2
        out = np.empty((h, w, 3), np.uint8)
        for ty, tx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            y0, x0 = ty * th, tx * tw
            y1, x1 = (h if ty else th), (w if tx else tw)
            src = photos[int(rng.integers(len(photos)))]
            out[y0:y1, x0:x1] = _crop(src, x1 - x0, y1 - y0, rng)
        return out
    return _crop(photos[int(rng.integers(len(photos)))], w, h, rng)


def photo_sample(photos: list[np.ndarray], index: int, w: int, h: int, seed: int = 0) -> dict:
    """Sample ``index``: the photo as ``jpg`` (q90) + the world sample's ``txt`` and ``json``."""
    rng = np.random.default_rng([seed, index, w, h])
    buf = io.BytesIO()
    Image.fromarray(make_photo(photos, w, h, rng)).save(buf, "JPEG", quality=90)
    world = make_sample(seed, "train", index, WORLD_SIDE)
    meta = world["json"]
    sx, sy = w / WORLD_SIDE, h / WORLD_SIDE
    for obj in meta["objects"]:
        x0, y0, x1, y1 = obj["box"]
        obj["box"] = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
    meta["width"], meta["height"] = w, h
    return {"__key__": world["__key__"], "jpg": buf.getvalue(), "txt": world["txt"], "json": meta}


_PHOTOS: list[np.ndarray] = []  # each process loads the sources once


def _sample(args: tuple[int, int, int, int]) -> dict:
    if not _PHOTOS:
        _PHOTOS.extend(source_photos().values())
    return photo_sample(_PHOTOS, *args)


def build(
    out: str | Path,
    n: int,
    w: int,
    h: int,
    seed: int = 0,
    shard_size: int = 500,
    processes: int = 1,
) -> list[Path]:
    """Write ``n`` photo samples to ``out/00000.tar``... plus the world tokenizer, rendering in
    ``processes`` processes (same bytes for any number)."""
    jobs = ((i, w, h, seed) for i in range(n))
    with (
        multiprocessing.get_context("fork").Pool(processes)
        if processes > 1
        else nullcontext() as pool
    ):
        samples = pool.imap(_sample, jobs, chunksize=8) if pool else map(_sample, jobs)
        tars = write_shards(samples, out, shard_size=shard_size, total=n)
    save_world_tokenizer(Path(out) / "tokenizer.json")
    return tars


@dataclass
class PhotoShardsConfig:
    """What ``python -m shards.photos`` writes (``--key value`` or ``key=value``)."""

    out: str = ""  # output folder (required)
    n: int = 3000  # images
    size: str | int = "1024x768"  # WIDTHxHEIGHT (an int is a mistake reported with the fix)
    seed: int = 0
    shard_size: int = 500  # samples per tar
    processes: int = os.cpu_count() or 1

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out: give the output folder, e.g. --out runs/bench/photo_1024")
        parts = str(self.size).lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"size: {str(self.size)!r}: give WIDTHxHEIGHT, e.g. 1024x768")

    @property
    def width_height(self) -> tuple[int, int]:
        w, h = (int(v) for v in str(self.size).lower().split("x"))
        return w, h


PROG = "python -m shards.photos"


def main(argv: list[str] | None = None) -> None:
    a = parse_cli(PhotoShardsConfig, PROG, __doc__, argv)
    logging.basicConfig(level=logging.INFO)
    build(a.out, a.n, *a.width_height, seed=a.seed, shard_size=a.shard_size, processes=a.processes)


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
