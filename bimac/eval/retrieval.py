"""Zero-shot image-text retrieval: R@1/5/10 both ways and their means mTR / mIR (BiMAC Table 5).

    python -m bimac.eval.retrieval --checkpoint CKPT --data SPEC [--out r.json]
    python -m bimac.eval.retrieval --open-clip ViT-B-32 --pretrained laion2b_s34b_b79k --data ...

``--data``: WebDataset shards (captions from ``json.captions_en`` if present, else ``txt``;
unreadable shards and samples are skipped and counted), ``world:retrieval:N`` (the embedded
world), a Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``) with ``--images
DIR`` and ``--split test`` (Flickr30k-1k, COCO-5k), or with ``--format clip_benchmark`` a
CLIP_benchmark webdataset folder (``--split`` names its sub-folder; ``--out`` then writes
CLIP_benchmark's result JSON). Similarities are computed in blocks of at most ``--max-sim-mb`` MiB.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from bimac.data.loader import SkipCounter
from bimac.data.samples import iter_samples
from bimac.eval import benchmarks
from bimac.eval.common import (
    Encoder,
    add_model_args,
    embed_images,
    embed_texts,
    encoder_from_args,
    note_skips,
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


def shard_pairs(
    spec: str, lang: str = "en", limit: int | None = None, counter: SkipCounter | None = None
):
    """Image bytes and caption lists from shards or the world; skips counted in ``counter``."""
    counter = counter or SkipCounter()
    images, captions = [], []
    for sample in iter_samples(spec, counter=counter):
        meta = sample.get("json") or {}
        caps = meta.get(f"captions_{lang}") or ([sample["txt"]] if "txt" in sample else [])
        if "jpg" not in sample or not caps:
            reason = "missing_image" if "jpg" not in sample else "missing_caption"
            counter.add(reason, f"{sample.get('__url__')}#{sample.get('__key__')}")
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
        prog="bimac eval retrieval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(ap)
    ap.add_argument(
        "--data",
        required=True,
        help="shards, world:retrieval:N, a Karpathy JSON, or a CLIP_benchmark folder",
    )
    ap.add_argument("--format", choices=["clip_benchmark"], help="--data is in this layout")
    ap.add_argument("--images", help="image folder (with a Karpathy JSON)")
    ap.add_argument("--split", default="test", help="Karpathy split / CLIP_benchmark sub-folder")
    ap.add_argument("--lang", default="en", help="caption language in shard JSON (captions_LANG)")
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument(
        "--max-sim-mb", type=int, default=256, help="memory bound of a similarity block"
    )
    args = ap.parse_args(argv)
    counter = SkipCounter()
    try:
        if args.format == "clip_benchmark":
            ds = benchmarks.read_clip_benchmark(args.data, args.split)
            if ds.kind != "retrieval":
                raise benchmarks.FormatError(
                    f"{ds.root / 'dataset_type.txt'}: not 'retrieval'; use bimac eval "
                    "classification --format clip_benchmark for a classification dataset"
                )
            images, captions = benchmarks.clip_benchmark_pairs(ds, counter, args.limit)
        elif args.data.endswith(".json"):
            if not args.images:
                ap.error("--images is required with a Karpathy JSON")
            images, captions = karpathy_pairs(args.data, args.images, args.split)
            if args.limit:
                images, captions = images[: args.limit], captions[: args.limit]
        else:
            images, captions = shard_pairs(args.data, args.lang, args.limit, counter)
        if not images:
            raise ValueError(f"{args.data}: no image with a caption to evaluate")
    except (OSError, ValueError) as exn:
        raise SystemExit(f"bimac eval retrieval: {exn}") from None
    results = evaluate(encoder_from_args(args), images, captions, args.batch_size, args.max_sim_mb)
    results["data"] = args.data
    note_skips(results, counter)
    benchmarks.report_wds(results, args, "Zero-shot retrieval", "zeroshot_retrieval")
    return results


if __name__ == "__main__":
    main()
