"""Classify images: zero-shot over ``--labels`` (prompt ensemble), or with a fine-tuned head.

    bimac classify IMG [IMG ...] --checkpoint DIR --labels "cat,dog,red circle" [--top 3]
    bimac classify IMG --checkpoint runs/demo/finetune_classification/export   # its trained head

Zero-shot: each label is put into every ``--template`` (default: CLIP's ensemble of 10 prompts),
the normalised text embeddings are averaged per label, and the image goes to the label of highest
cosine similarity; probabilities are a softmax of the model's logit scale times the similarities.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bimac.tools.images import BATCH_CONVENTION, ImageBatch, pixels


class NoClassifierHead(ValueError):
    """No ``--labels`` for an export without a fine-tuned classification head."""


@torch.no_grad()
def classify(
    checkpoint: str | Path,
    images: list[bytes],
    labels: list[str] | None = None,
    templates: list[str] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """``(class names, probabilities [N, C])`` for images (the bytes of image files)."""
    from bimac.eval.classification import CLIP_TEMPLATES, class_weights
    from bimac.eval.common import bimac_encoder
    from bimac.models.classifier import HEAD_FILE, ImageClassifier

    directory = Path(checkpoint)
    if not labels:
        if not (directory / HEAD_FILE).is_file():
            raise NoClassifierHead(
                f"{directory} has no fine-tuned classifier head ({HEAD_FILE}): give --labels "
                "for zero-shot classification, e.g. --labels 'cat,dog'"
            )
        model, names = ImageClassifier.from_pretrained(directory)
        model.eval()
        return names, model(pixels(images, model.bimac.config.image_size)).softmax(-1)
    enc = bimac_encoder(directory)
    weights = class_weights(enc, labels, templates or CLIP_TEMPLATES)
    feats = enc.images(pixels(images, enc.image_size))
    scale = enc.model.coca.logit_scale.exp().clamp(max=100)
    return labels, (scale * feats @ weights.T).softmax(-1)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(
        prog="bimac classify",
        description=__doc__,
        epilog=BATCH_CONVENTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--checkpoint", required=True, help="BiMAC export directory")
    ap.add_argument(
        "--labels",
        default="",
        help="comma-separated class names (default: the "
        "export's fine-tuned head and classnames.txt)",
    )
    ap.add_argument(
        "--template",
        action="append",
        default=None,
        help="prompt with {} for the label; repeat for an ensemble (default: CLIP's 10)",
    )
    ap.add_argument(
        "--top", type=int, default=3, help="labels shown per image (default: %(default)s)"
    )
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] or None
    batch = ImageBatch("bimac classify")
    readable = batch.read(args.images)
    rows = []
    if readable:
        try:
            names, probs = classify(
                args.checkpoint, [data for _, data in readable], labels, args.template
            )
        except NoClassifierHead as exn:
            raise SystemExit(f"bimac classify: {exn}") from None
        for (path, _), p in zip(readable, probs):
            top = p.topk(min(args.top, len(names)))
            ranked = [(names[i], float(v)) for v, i in zip(top.values, top.indices)]
            rows.append({"image": path, "top": ranked})
            print(path + "\t" + ", ".join(f"{n} {v:.3f}" for n, v in ranked))
    if args.out and rows:
        Path(args.out).write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    batch.finish()
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
