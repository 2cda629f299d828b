"""Raw samples of a data spec and images as model input: the readers evaluation, fine-tuning and
the tools share with training.

A spec is ``world:SPLIT[:N[:SEED][:VARIANT]]`` (the embedded world rendered in memory, no files;
VARIANT one of :data:`bimac.data.world.VARIANTS`, default ``default``) or a WebDataset
shard pattern (``dir/{00000..00003}.tar``), read through training's tar reader
(:func:`bimac.data.loader.shard_samples`): a shard that is missing, truncated or malformed and a
sample with bad JSON or a caption that is not UTF-8 are skipped and counted by reason in a
:class:`~bimac.data.loader.SkipCounter`, as in training; so is an image that does not decode
(``bad_image``) or claims too many pixels (``image_too_large``). Images go through training's decoder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from bimac.data.decode import decode_image
from bimac.data.loader import IMAGE_EXTS, SkipCounter, expand_shards, shard_samples

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)  # image files of a folder
CHECK_SIZE = 16  # side of the check decode: JPEGs decode at 1/8 scale, the whole stream is read


def parse_world(spec: str) -> tuple[str, int] | None:
    """``world:SPLIT[:N]`` -> (split, n) or None for other specs."""
    if not spec.startswith("world:"):
        return None
    parts = spec.split(":")
    return parts[1], int(parts[2]) if len(parts) > 2 else 200


def world_options(spec: str) -> tuple[int | None, str]:
    """The optional fields after ``world:SPLIT:N``: a seed (an integer) and a world variant (a
    name), in either order: ``world:cls_shape:512:1``, ``world:retrieval:1000:binding``."""
    seed, variant = None, "default"
    for part in spec.split(":")[3:]:
        if part.isdigit():
            seed = int(part)
        else:
            variant = part
    return seed, variant


def iter_samples(
    spec: str, seed: int = 0, size: int = 64, counter: SkipCounter | None = None
) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", "jpg", "json", "txt", "cls", ...}`` of a world spec or shards.

    Shard members keep their bytes except ``json`` (parsed) and ``txt``/``cls`` (decoded,
    stripped); the image is the first of :data:`IMAGE_EXTS` present, as ``jpg``. Skips are counted
    in ``counter`` (a fresh one when None).
    """
    world = parse_world(spec)
    if world:
        from bimac.data.world import make_sample

        split, n = world
        count = 2 * n if split == "probe" else n  # n pairs for the probe split
        for i in range(count):
            yield make_sample(seed, split, i, size, variant=world_options(spec)[1])
        return
    counter = counter or SkipCounter()
    for raw in shard_samples(expand_shards(spec), counter):
        key = f"{raw.get('__url__')}#{raw.get('__key__')}"
        sample = {"__key__": raw["__key__"], "__url__": raw.get("__url__", "")}
        image = next((e for e in IMAGE_EXTS if e in raw), None)
        if image:
            try:  # a cheap reduced-size decode finds a truncated or broken image, as training would
                decode_image(raw[image], CHECK_SIZE)
            except Image.DecompressionBombError as exn:
                counter.add("image_too_large", f"{key}: {exn}")
                continue
            except Exception as exn:  # PIL and simplejpeg raise many types for broken files
                counter.add("bad_image", f"{key}: {exn!r}")
                continue
            sample["jpg"] = raw[image]
        try:
            if "json" in raw:
                sample["json"] = json.loads(raw["json"])
        except ValueError:
            counter.add("bad_json", key)
            continue
        try:
            for field in ("txt", "cls"):
                if field in raw:
                    sample[field] = raw[field].decode("utf-8").strip()
        except UnicodeDecodeError:
            counter.add("bad_caption_encoding", key)
            continue
        yield sample


def image_chw(source: bytes | str | Path, size: int) -> np.ndarray:
    """Image bytes or file -> ``uint8 [3, size, size]`` through training's decoder (shorter side
    to ``size``, bicubic, centre crop). Raises what the decoder raises for a bad image."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return np.ascontiguousarray(decode_image(data, size)[0].transpose(2, 0, 1))


def image_files(directory: str | Path) -> list[Path]:
    """Image files under ``directory`` (recursively, sorted), by :data:`IMAGE_SUFFIXES`."""
    return sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
