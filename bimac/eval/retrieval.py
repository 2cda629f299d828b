"""Zero-shot image-text retrieval: R@1/5/10 both ways and their means mTR / mIR (BiMAC Table 5).

    python -m bimac.eval.retrieval --checkpoint CKPT --data SPEC [--out r.json]
    python -m bimac.eval.retrieval --open-clip ViT-B-32 --pretrained laion2b_s34b_b79k --data ...

``--data``: WebDataset shards (captions from ``json.captions_en`` if present, else ``txt``),
``world:retrieval:N`` (the embedded world), or a Karpathy-split JSON (``dataset_coco.json``,
``dataset_flickr30k.json``) with ``--images DIR`` and ``--split test`` (Flickr30k-1k, COCO-5k).
Similarities are computed in blocks of at most ``--max-sim-mb`` MiB.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from bimac.eval.common import (
    Encoder,
    add_model_args,
    embed_images,
    embed_texts,
    encoder_from_args,
    iter_samples,
    report,
)
from bimac.metrics.recall import retrieval_metrics

logger = logging.getLogger(__name__)


def karpathy_pairs(
    path: str | Path, image_dir: str | Path, split: str, captions_per_image: int = 5
):
    """Image paths and, per image, its first ``captions_per_image`` raw captions."""
    data = json.loads(Path(path).read_text())
    images, captions = [], []
    for item in data["images"]:
        if item.get("split") != split:
            continue
        images.append(Path(image_dir) / item.get("filepath", "") / item["filename"])
        captions.append([s["raw"].strip() for s in item["sentences"]][:captions_per_image])
    if not images:
        raise ValueError(f"{path}: no images in split {split!r}")
    return images, captions


def shard_pairs(spec: str, lang: str = "en", limit: int | None = None):
    """Image bytes and caption lists from shards or the world."""
    images, captions = [], []
    for sample in iter_samples(spec):
        meta = sample.get("json") or {}
        caps = meta.get(f"captions_{lang}") or ([sample["txt"]] if "txt" in sample else [])
        if "jpg" not in sample or not caps:
            logger.warning("skipping %s: no image or caption", sample.get("__key__"))
            continue
        images.append(sample["jpg"])
        captions.append(list(caps))
        if limit and len(images) >= limit:
            break
    return images, captions


def evaluate(
    encoder: Encoder,
    images: list,
    captions: list[list[str]],
    batch_size: int = 256,
    max_sim_mb: int = 256,
) -> dict:
    """Embed everything once and score both directions."""
    image_emb = embed_images(encoder, images, batch_size, total=len(images))
    flat = [c for caps in captions for c in caps]
    text_to_image = torch.repeat_interleave(
        torch.arange(len(captions)), torch.tensor([len(c) for c in captions])
    )
    text_emb = embed_texts(encoder, flat, batch_size)
    out = retrieval_metrics(image_emb, text_emb, text_to_image, max_bytes=max_sim_mb * 2**20)
    out.update(images=len(images), texts=len(flat), model=encoder.name)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(ap)
    ap.add_argument("--data", required=True, help="shards, world:retrieval:N, or Karpathy JSON")
    ap.add_argument("--images", help="image folder (with a Karpathy JSON)")
    ap.add_argument("--split", default="test", help="Karpathy split")
    ap.add_argument("--lang", default="en", help="caption language in shard JSON (captions_LANG)")
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument(
        "--max-sim-mb", type=int, default=256, help="memory bound of a similarity block"
    )
    args = ap.parse_args(argv)
    if args.data.endswith(".json"):
        if not args.images:
            ap.error("--images is required with a Karpathy JSON")
        images, captions = karpathy_pairs(args.data, args.images, args.split)
        if args.limit:
            images, captions = images[: args.limit], captions[: args.limit]
    else:
        images, captions = shard_pairs(args.data, args.lang, args.limit)
    results = evaluate(encoder_from_args(args), images, captions, args.batch_size, args.max_sim_mb)
    results["data"] = args.data
    report(results, args.out, "Zero-shot retrieval")
    return results


if __name__ == "__main__":
    main()
