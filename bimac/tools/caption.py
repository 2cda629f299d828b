"""Caption images with a BiMAC export (English) or a PAL export (Bengali).

    bimac caption IMG [IMG ...] --checkpoint DIR [--strategy beam --num-beams 3] [--out caps.json]

The export kind is read from its ``config.yaml``: a BiMAC export (``model`` section, from
``python -m pretrain`` / ``finetune.caption``) captions with its CoCa decoder; a PAL export
(``finetune.caption_bn``) with its mBART-50 decoder, forced to Bengali.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from bimac.tools.images import BATCH_CONVENTION, ImageBatch, pixels


def is_bimac_export(directory: str | Path) -> bool:
    """True for a BiMAC export, False for a PAL captioner export; else an error."""
    from bimac import export_folder

    path = export_folder.check(directory) / export_folder.CONFIG_FILE
    data = yaml.safe_load(path.read_text()) or {}
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


@torch.no_grad()
def caption_images(
    checkpoint: str | Path,
    images: list[bytes],
    strategy: str = "beam",
    num_beams: int = 3,
    max_new_tokens: int = 20,
) -> list[str]:
    """One caption per image (the bytes of an image file)."""
    from bimac.generation import GenerationConfig

    if is_bimac_export(checkpoint):
        from bimac.eval.captioning import generate_captions

        out = generate_captions(
            checkpoint,
            dict(enumerate(images)),
            None,
            strategy,
            num_beams if strategy == "beam" else 1,
            max_new_tokens,
            batch_size=16,
        )
        return [out[i] for i in range(len(images))]
    from bimac.models.baseline_captioners import load_captioner

    model = load_captioner(checkpoint).eval()
    cfg = GenerationConfig(
        strategy=strategy,
        num_beams=num_beams if strategy == "beam" else 1,
        max_new_tokens=min(max_new_tokens, model.cfg.max_length),
        no_repeat_ngram_size=3,
    )
    return list(model.caption(pixels(images, model.cfg.image_size), cfg).texts)


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(
        prog="bimac caption",
        description=__doc__,
        epilog=BATCH_CONVENTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--checkpoint", required=True, help="BiMAC or PAL export directory")
    ap.add_argument(
        "--strategy",
        default="beam",
        choices=["greedy", "beam"],
        help="decoding (default: %(default)s)",
    )
    ap.add_argument("--num-beams", type=int, default=3, help="beam width (default: %(default)s)")
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=20,
        help="longest caption in tokens (default: %(default)s)",
    )
    ap.add_argument(
        "--out", default=None, help="also write [{image, caption}] JSON here (default: print only)"
    )
    args = ap.parse_args(argv)
    batch = ImageBatch("bimac caption")
    readable = batch.read(args.images)
    captions = []
    if readable:
        captions = caption_images(
            args.checkpoint,
            [data for _, data in readable],
            args.strategy,
            args.num_beams,
            args.max_new_tokens,
        )
    rows = [{"image": path, "caption": cap} for (path, _), cap in zip(readable, captions)]
    for row in rows:
        print(f"{row['image']}\t{row['caption']}")
    if args.out and rows:
        Path(args.out).write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    batch.finish()
    return captions


if __name__ == "__main__":
    main(sys.argv[1:])
