"""Text-to-image search over a folder: rank images by cosine similarity to a query.

bimac retrieve --checkpoint DIR --images DIR --query "a red circle left of a blue square" [--top 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bimac.tools.images import BATCH_CONVENTION, ImageBatch

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def image_files(image_dir: str | Path) -> list[Path]:
    """Files under ``image_dir`` (recursively) with an image extension, sorted."""
    if not Path(image_dir).is_dir():
        raise FileNotFoundError(f"--images {image_dir}: not a folder")
    paths = sorted(p for p in Path(image_dir).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(
            f"--images {image_dir}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return paths


@torch.no_grad()
def retrieve(
    checkpoint: str | Path,
    images: list[tuple[str, bytes]],
    queries: list[str],
    top: int = 5,
    batch_size: int = 64,
) -> list[list[tuple[str, float]]]:
    """Per query, the ``top`` (image path, cosine similarity) pairs of ``(path, file bytes)``
    images, best first."""
    from bimac.eval.common import bimac_encoder, embed_images, embed_texts

    enc = bimac_encoder(checkpoint)
    feats = embed_images(enc, [data for _, data in images], batch_size, len(images))
    best = (embed_texts(enc, queries, batch_size) @ feats.T).topk(min(top, len(images)), dim=1)
    return [
        [(images[i][0], float(v)) for v, i in zip(vals, idx)]
        for vals, idx in zip(best.values, best.indices)
    ]


def main(argv: list[str] | None = None) -> list:
    ap = argparse.ArgumentParser(
        prog="bimac retrieve",
        description=__doc__,
        epilog=BATCH_CONVENTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--checkpoint", required=True, help="BiMAC export directory")
    ap.add_argument("--images", required=True, help="folder searched recursively for images")
    ap.add_argument(
        "--query", required=True, action="append", help="text query; repeat for several"
    )
    ap.add_argument(
        "--top", type=int, default=5, help="images shown per query (default: %(default)s)"
    )
    ap.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    try:
        paths = image_files(args.images)
    except FileNotFoundError as exn:
        raise SystemExit(f"bimac retrieve: {exn}") from None
    batch = ImageBatch("bimac retrieve")
    readable = batch.read(paths)
    results = []
    if readable:
        results = retrieve(args.checkpoint, readable, args.query, args.top, args.batch_size)
    for q, hits in zip(args.query, results):
        print(f"# {q}")
        for path, score in hits:
            print(f"{score:.4f}\t{path}")
    if args.out and results:
        Path(args.out).write_text(json.dumps(dict(zip(args.query, results)), indent=1))
    batch.finish()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
