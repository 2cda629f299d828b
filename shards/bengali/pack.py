"""Stage 4: (real image, synthetic image, BN caption, EN caption, metadata) -> triplet shards.

``python -m shards.bengali.pack --synthetic work/synthetic --images coco/train2014 --out shards/bn``
writes ``NNNNN.tar`` with ``KEY.jpg`` (real), ``KEY.syn.jpg``, ``KEY.txt`` and ``KEY.en.txt``
(English), ``KEY.bn.txt``, ``KEY.json`` (ids, LaBSE similarity, prompt, prompt SHA-256, seed;
the sidecar's model names, versions and settings under ``synthesis``) and ``NNNNN_stats.json`` (img2dataset's counters plus the samples dropped and why).

``python -m shards.bengali.pack --from-world --n 256 --out DIR`` builds the same layout from the
embedded world (:mod:`bimac.data.world`, whose scenes come with EN/BN captions and a rendered
companion), with no model at all.

Shard ``k`` holds input items ``[k * shard_size, (k + 1) * shard_size)``; a shard is written to a
temporary folder with :func:`bimac.data.writer.write_shards` and moved into place, its stats file
last, so a rerun skips finished shards and never sees a half-written one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from bimac.config import ConfigError, parse_cli, run_main
from bimac.data.writer import write_shards
from shards.bengali.resumable import (
    ShardRun,
    atomic_write_json,
    read_csv,
    require_input,
    setup_logging,
)
from shards.bengali.synthesise import FIELDS as SYNTH_FIELDS
from shards.bengali.synthesise import build_prompt, prompt_sha256

log = logging.getLogger(__name__)
T = TypeVar("T")

#: sidecar fields kept under ``synthesis`` in ``KEY.json``: how the companion was made
SYNTHESIS_FIELDS = (
    "negative_prompt", "height", "width", "prior_steps", "decoder_steps", "prior_guidance_scale",
    "guidance_scale", "prior_model", "decoder_model", "dtype", "device", "versions", "generator",
    "jpeg_quality", "image_sha256",
)  # fmt: skip


@dataclass
class PackConfig:
    synthetic: Path = Path("work/bengali/synthetic")  # the synthesise stage's --out
    images: Path = Path("data/coco/train2014")  # real images
    image_pattern: str = "COCO_train2014_{image_id:012d}.jpg"
    out: Path = Path("work/bengali/shards")
    shard_size: int = 1000
    from_world: bool = False  # build from the embedded world instead (no model, no COCO)
    n: int = 256  # world samples
    size: int = 64  # world image side
    seed: int = 0  # world seed


class BadSample(Exception):
    """An input that cannot become a sample; ``reason`` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _jpeg_bytes(path: Path, what: str) -> bytes:
    """The file's bytes if it is a decodable JPEG, else a decodable image re-encoded as JPEG."""
    if not path.is_file():
        raise BadSample(f"missing_{what}", str(path))
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format == "JPEG":
                return data
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=95)
            return buf.getvalue()
    except Exception as err:  # PIL raises several types for corrupt files
        raise BadSample(f"undecodable_{what}", f"{path}: {err}") from err


def _good_samples(
    group: Sequence[T], make_sample: Callable[[T], dict[str, Any]], status: Counter[str], shard: int
) -> Iterator[dict[str, Any]]:
    """The samples of ``group`` that could be made; the others counted in ``status`` and logged."""
    for item in group:
        try:
            sample = make_sample(item)
        except BadSample as err:
            status[err.reason] += 1
            log.warning("pack shard %05d: skipped %s", shard, err)
            continue
        status["success"] += 1
        yield sample


def pack(
    items: Sequence[T], make_sample: Callable[[T], dict[str, Any]], out: Path, shard_size: int
) -> dict[str, Any]:
    """Write ``make_sample(item)`` for every item into triplet shards under ``out``.

    An item whose ``make_sample`` raises :class:`BadSample` is left out, counted under its reason
    in the shard's stats and logged. Returns the totals over all shards (finished ones included).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (len(items) + shard_size - 1) // shard_size
    totals: Counter[str] = Counter()
    skipped = 0
    for k in range(n_shards):
        stats_path = out / f"{k:05d}_stats.json"
        if stats_path.is_file():
            skipped += 1
            totals.update(json.loads(stats_path.read_text())["status_dict"])
            continue
        status: Counter[str] = Counter()
        tmp = out / f".tmp_{k:05d}"  # no PID: a rerun after a kill clears the same folder
        shutil.rmtree(tmp, ignore_errors=True)
        group = items[k * shard_size : (k + 1) * shard_size]
        tars = write_shards(
            _good_samples(group, make_sample, status, k), tmp, shard_size=shard_size + 1
        )
        if tars:
            os.replace(tars[0], out / f"{k:05d}.tar")
        shutil.rmtree(tmp, ignore_errors=True)
        # counts only (no wall-clock times): a rerun writes the same bytes
        atomic_write_json(stats_path, {
            "count": sum(status.values()), "successes": status["success"],
            "failed_to_download": 0, "failed_to_resize": 0, "status_dict": dict(status),
        })  # fmt: skip
        totals.update(status)
        log.info("pack shard %05d: %s", k, dict(status))
    if skipped:
        log.info(
            "pack: %d of %d shards in %s were already finished%s",
            skipped,
            n_shards,
            out,
            "; nothing to do" if skipped == n_shards else "",
        )
    return {"shards": n_shards, "already_finished": skipped, "status": dict(totals)}


def synthesised_rows(synthetic: Path) -> list[dict[str, str]]:
    """Rows of every synthesise shard in ``synthetic``, in shard order; all must be finished."""
    synthetic = Path(synthetic)
    unfinished = sorted(p.name for p in synthetic.glob("shard_*.parts"))
    summaries = sorted(synthetic.glob("shard_*.summary.json"))
    if unfinished or not summaries:
        raise FileNotFoundError(f"pack: synthesise is not finished in {synthetic}: {unfinished}")
    rows = []
    for s in summaries:
        index = int(s.name.split("_")[1].split(".")[0])
        rows += read_csv(ShardRun(synthetic, "synthesise", index, SYNTH_FIELDS).csv_path)
    return rows


def coco_triplet(row: dict[str, str], cfg: PackConfig) -> dict[str, Any]:
    """Triplet sample of one synthesised row: the COCO image, the companion, captions, sidecar."""
    real = _jpeg_bytes(
        Path(cfg.images) / cfg.image_pattern.format(image_id=int(row["image_id"])), "real"
    )
    syn = _jpeg_bytes(Path(cfg.synthetic) / row["image"], "synthetic")
    sidecar_path = Path(cfg.synthetic) / row["sidecar"]
    if not sidecar_path.is_file():
        raise BadSample("missing_sidecar", str(sidecar_path))
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    with Image.open(io.BytesIO(real)) as img:
        width, height = img.size
    meta = {
        "caption_id": row["caption_id"], "image_id": row["image_id"],
        "similarity": float(row["similarity"]), "captions_en": [row["en"]],
        "captions_bn": [row["bn"]], "width": width, "height": height,
        "prompt": sidecar["prompt"], "prompt_sha256": sidecar["prompt_sha256"],
        "seed": sidecar["seed"], "synthesis": {k: sidecar[k] for k in SYNTHESIS_FIELDS},
    }  # fmt: skip
    return {
        "__key__": row["key"],
        "jpg": real,
        "syn.jpg": syn,
        "txt": row["en"],
        "en.txt": row["en"],
        "bn.txt": row["bn"],
        "json": meta,
    }


def world_triplet(index: int, cfg: PackConfig) -> dict[str, Any]:
    """Triplet sample of embedded-world scene ``index`` (captions and companion from the world)."""
    from bimac.data.world import make_sample

    sample = make_sample(cfg.seed, "train", index, cfg.size, triplet=True)
    prompt = build_prompt(sample["en.txt"], sample["bn.txt"])
    sample["json"] |= {"similarity": None, "prompt": prompt, "prompt_sha256": prompt_sha256(prompt)}
    return sample


PROG = "python -m shards.bengali.pack"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    cfg = parse_cli(PackConfig, PROG, __doc__, argv, "stage YAML (configs/bengali/*.yaml)")
    if cfg.out.is_dir() and any(cfg.out.glob("*.py")):
        raise ConfigError(
            f"out: {cfg.out} holds Python sources; give a data directory, e.g. out=work/bengali/shards"
        )
    if not cfg.from_world:
        require_input(cfg.synthetic, "synthetic", "`python -m shards.bengali.synthesise` writes it")
        require_input(cfg.images, "images", "give the folder of the real (COCO train2014) images")
    if cfg.from_world:
        return pack(range(cfg.n), lambda i: world_triplet(i, cfg), cfg.out, cfg.shard_size)
    rows = synthesised_rows(cfg.synthetic)
    return pack(rows, lambda r: coco_triplet(r, cfg), cfg.out, cfg.shard_size)


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
