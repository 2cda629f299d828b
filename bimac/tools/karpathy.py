"""Karpathy-split JSON (``dataset_coco.json`` / ``dataset_flickr30k.json``) + images -> what the
fine-tuning stages read: img2dataset-layout shards for training and COCO-format caption files
for evaluation.

    python -m bimac.tools.karpathy --json data/coco/dataset_coco.json --images data/coco/images \
        --split train --out data/coco_karpathy_train          # shards (train + restval: --split train,restval)
    python -m bimac.tools.karpathy --json data/coco/dataset_coco.json --images data/coco/images \
        --split test --coco-json data/coco/annotations/captions_karpathy_test.json

Each shard sample keeps the image's bytes as stored, its first caption as ``KEY.txt`` and all its
captions in ``KEY.json`` (``captions_en``, which the loader draws from each epoch and SCST uses as
references; ``nouns`` is empty per caption: the real data has no noun annotations). An image file
that is missing is skipped, counted and logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def karpathy_images(path: str | Path, splits: set[str]) -> list[dict]:
    """The ``images`` entries of a Karpathy JSON whose ``split`` is in ``splits``."""
    items = [it for it in json.loads(Path(path).read_text())["images"] if it.get("split") in splits]
    if not items:
        raise ValueError(f"{path}: no images in splits {sorted(splits)}")
    return items


def _relpath(item: dict) -> str:
    return str(Path(item.get("filepath", "")) / item["filename"])


def shard_samples(items: list[dict], image_dir: str | Path, skipped: dict) -> Iterator[dict]:
    """Webdataset sample dicts of Karpathy entries (missing images counted in ``skipped``)."""
    for n, item in enumerate(items):
        file = Path(image_dir) / _relpath(item)
        if not file.is_file():
            skipped["missing_image"] = skipped.get("missing_image", 0) + 1
            logger.warning("skipped %s: no such image file", file)
            continue
        caps = [s["raw"].strip() for s in item["sentences"] if s["raw"].strip()]
        if not caps:
            skipped["empty_caption"] = skipped.get("empty_caption", 0) + 1
            continue
        image_id = item.get("cocoid", item.get("imgid", n))
        meta = {
            "captions_en": caps,
            "nouns": [[] for _ in caps],
            "split": item["split"],
            "file": _relpath(item),
            "image_id": image_id,
        }
        yield {"__key__": f"{n:09d}", "jpg": file.read_bytes(), "txt": caps[0], "json": meta}


def coco_captions(items: list[dict]) -> dict:
    """COCO caption-annotation format (what ``bimac.eval.captioning`` and pycocoevalcap read)."""
    images, annotations = [], []
    for n, item in enumerate(items):
        image_id = item.get("cocoid", item.get("imgid", n))
        images.append({"id": image_id, "file_name": _relpath(item)})
        for s in item["sentences"]:
            annotations.append(
                {"id": len(annotations), "image_id": image_id, "caption": s["raw"].strip()}
            )
    return {"images": images, "annotations": annotations}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m bimac.tools.karpathy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--json", required=True, help="Karpathy JSON (dataset_coco.json, ...)")
    ap.add_argument("--images", default="", help="image root (files at ROOT/filepath/filename)")
    ap.add_argument(
        "--split", default="train", help="comma-separated Karpathy splits (default: %(default)s)"
    )
    ap.add_argument("--out", default=None, help="write shards here")
    ap.add_argument(
        "--shard-size", type=int, default=1000, help="images per tar (default: %(default)s)"
    )
    ap.add_argument(
        "--coco-json", default=None, help="write COCO-format captions of the split here"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if not (args.out or args.coco_json):
        ap.error("give --out (shards) and/or --coco-json (evaluation annotations)")
    items = karpathy_images(args.json, {s.strip() for s in args.split.split(",") if s.strip()})
    report: dict = {"images": len(items), "skipped": {}}
    if args.coco_json:
        Path(args.coco_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.coco_json).write_text(json.dumps(coco_captions(items)))
    if args.out:
        from bimac.data.writer import write_shards

        tars = write_shards(
            shard_samples(items, args.images, report["skipped"]),
            args.out,
            args.shard_size,
            total=len(items),
        )
        report["shards"] = [str(t) for t in tars]
    print(json.dumps({k: v for k, v in report.items() if k != "shards"}))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
