"""Zero-shot classification with prompt-template ensembles (CLIP-style).

    python -m bimac.eval.classification --checkpoint CKPT --data SPEC \
        [--classnames classes.txt] [--templates templates.txt] [--out c.json]

``--data``: an ImageFolder tree (``DIR/<class>/*.jpg``, classes in sorted order), WebDataset
shards with a ``cls`` field (``--classnames`` required), ``world:cls_shape:N`` /
``world:cls_colour_shape:N``, or with ``--format clip_benchmark`` a CLIP_benchmark webdataset
folder (its ``classnames.txt`` and ``zeroshot_classification_templates.txt``; ``--out`` then
writes CLIP_benchmark's result JSON). ``--classnames``: one name per line, in label order;
``--templates``: one prompt per line with ``{}`` for the class name (default: a CLIP-style
ensemble, or the world's own). Reports top-1, top-5 and mean per-class recall (%).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from bimac.data.loader import SkipCounter
from bimac.data.samples import IMAGE_SUFFIXES, iter_samples, parse_world, world_options
from bimac.eval import benchmarks
from bimac.eval.common import (
    Encoder,
    add_model_args,
    embed_images,
    embed_texts,
    encoder_from_args,
    note_skips,
)

logger = logging.getLogger(__name__)

CLIP_TEMPLATES = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "itap of a {}.",
]


def world_templates(split: str) -> list[str]:
    """Prompts in the embedded world's caption style ("An orange cross."); shape classes get
    one prompt per colour, so the ensemble averages over the attribute that is not the label."""
    if split == "cls_shape":
        from bimac.data.world import COLOURS

        return [f"{'An' if c[0] in 'aeiou' else 'A'} {c} {{}}." for c in COLOURS]
    return ["A {}.", "An {}."]


def class_weights(
    encoder: Encoder, classnames: list[str], templates: list[str], batch_size: int = 256
) -> torch.Tensor:
    """``[C, D]``: per class, the normalised mean of its normalised template embeddings."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every template needs a '{}' placeholder for the class name")
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = embed_texts(encoder, prompts, batch_size).view(len(classnames), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """Top-k accuracies and mean per-class recall (over classes present in ``labels``), in %.

    Ties in the logits are broken towards the lower class index (``torch.topk`` order is not
    relied upon: a stable descending sort).
    """
    labels = labels.long()
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    hit_rank = (order == labels[:, None]).float().argmax(dim=1)
    out = {
        f"top{k}": 100.0 * float((hit_rank < k).float().mean()) for k in ks if k <= logits.shape[1]
    }
    correct = (hit_rank == 0).float()
    present = labels.unique()
    per_class = torch.stack([correct[labels == c].mean() for c in present])
    out["mean_per_class_recall"] = 100.0 * float(per_class.mean())
    return out


def image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Paths, labels and class directory names of an ImageFolder tree."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for i, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(i)
    if not paths:
        raise ValueError(f"{root}: no images in class sub-folders")
    return paths, labels, classes


def shard_items(spec: str, counter: SkipCounter | None = None) -> tuple[list[bytes], list[int]]:
    """Image bytes and integer labels from shards (``cls``) or a world split (``label_index``);
    samples without an image or a label are skipped and counted in ``counter``."""
    counter = counter or SkipCounter()
    images, labels = [], []
    for s in iter_samples(spec, counter=counter):
        label = s.get("cls", (s.get("json") or {}).get("label_index"))
        key = f"{s.get('__url__')}#{s.get('__key__')}"
        if "jpg" not in s:
            counter.add("missing_image", key)
        elif label is None or not str(label).isdigit():
            counter.add("missing_label", key)
        else:
            images.append(s["jpg"])
            labels.append(int(label))
    return images, labels


def evaluate(encoder: Encoder, images, labels, classnames, templates, batch_size=256) -> dict:
    weights = class_weights(encoder, classnames, templates, batch_size)
    feats = embed_images(encoder, images, batch_size, total=len(images))
    labels = torch.tensor(labels)
    if int(labels.max()) >= len(classnames):
        raise ValueError(f"label {int(labels.max())} but only {len(classnames)} class names")
    out = classification_metrics(feats @ weights.T, labels)
    out.update(
        images=len(labels),
        classes=len(classnames),
        templates=len(templates),
        chance_top1=100.0 / len(classnames),
        model=encoder.name,
    )
    return out


def read_lines(path: str) -> list[str]:
    return [
        line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="bimac eval classification",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(ap)
    ap.add_argument(
        "--data",
        required=True,
        help="ImageFolder dir, shards with cls, world:cls_shape:N, or a CLIP_benchmark folder",
    )
    ap.add_argument("--format", choices=["clip_benchmark"], help="--data is in this layout")
    ap.add_argument("--split", default="test", help="CLIP_benchmark sub-folder")
    ap.add_argument("--classnames", help="file: one class name per line, in label order")
    ap.add_argument("--templates", help="file: one prompt per line with {}")
    args = ap.parse_args(argv)
    counter = SkipCounter()
    try:
        world = parse_world(args.data)
        classnames = read_lines(args.classnames) if args.classnames else None
        templates = read_lines(args.templates) if args.templates else None
        if args.format == "clip_benchmark":
            ds = benchmarks.read_clip_benchmark(args.data, args.split)
            if ds.kind != "classification":
                raise benchmarks.FormatError(
                    f"{ds.root / 'dataset_type.txt'}: says {ds.kind!r}; use bimac eval "
                    f"{ds.kind} --format clip_benchmark"
                )
            classnames = classnames or ds.classnames
            templates = templates or ds.templates
            if not classnames:
                raise benchmarks.FormatError(f"{ds.root / 'classnames.txt'}: missing")
            images, labels = shard_items(ds.shards, counter)
        elif world:
            from bimac.data.world import class_names

            images, labels = shard_items(args.data, counter)
            classnames = classnames or class_names(world[0], world_options(args.data)[1])
            templates = templates or world_templates(world[0])
        elif Path(args.data).is_dir():
            images, labels, dirs = image_folder(args.data)
            classnames = classnames or [d.replace("_", " ") for d in dirs]
        else:
            if not classnames:
                ap.error("--classnames is required with shards")
            images, labels = shard_items(args.data, counter)
        if not images:
            raise ValueError(f"{args.data}: no labelled image to evaluate")
    except (OSError, ValueError) as exn:
        raise SystemExit(f"bimac eval classification: {exn}") from None
    results = evaluate(
        encoder_from_args(args),
        images,
        labels,
        classnames,
        templates or CLIP_TEMPLATES,
        args.batch_size,
    )
    results["data"] = args.data
    note_skips(results, counter)
    benchmarks.report_wds(results, args, "Zero-shot classification", "zeroshot_classification")
    return results


if __name__ == "__main__":
    main()
