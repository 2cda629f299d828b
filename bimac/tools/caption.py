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

import numpy as np
import torch
import yaml


def is_bimac_export(directory: str | Path) -> bool:
    """True for a BiMAC export, False for a PAL captioner export; else an error."""
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.yaml (not an export directory)")
    data = yaml.safe_load(path.read_text()) or {}
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """uint8 ``[N, 3, size, size]`` (shorter side resized, centre crop, as in evaluation)."""
    from bimac.data.samples import image_chw

    return torch.from_numpy(np.stack([image_chw(p, size) for p in paths]))


@torch.no_grad()
def caption_images(
    checkpoint: str | Path,
    paths: list[str],
    strategy: str = "beam",
    num_beams: int = 3,
    max_new_tokens: int = 20,
) -> list[str]:
    """One caption per image path."""
    from bimac.generation import GenerationConfig

    if is_bimac_export(checkpoint):
        from bimac.eval.captioning import generate_captions

        out = generate_captions(
            checkpoint,
            {i: Path(p) for i, p in enumerate(paths)},
            None,
            strategy,
            num_beams if strategy == "beam" else 1,
            max_new_tokens,
            batch_size=16,
        )
        return [out[i] for i in range(len(paths))]
    from bimac.models.pal_captioner import PALCaptioner

    model = PALCaptioner.from_pretrained(checkpoint).eval()
    cfg = GenerationConfig(
        strategy=strategy,
        num_beams=num_beams if strategy == "beam" else 1,
        max_new_tokens=min(max_new_tokens, model.cfg.max_length),
        no_repeat_ngram_size=3,
    )
    return list(model.caption(load_images(paths, model.cfg.image_size), cfg).texts)


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(
        prog="bimac caption",
        description=__doc__,
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
    captions = caption_images(
        args.checkpoint, args.images, args.strategy, args.num_beams, args.max_new_tokens
    )
    for path, cap in zip(args.images, captions):
        print(f"{path}\t{cap}")
    if args.out:
        rows = [{"image": p, "caption": c} for p, c in zip(args.images, captions)]
        Path(args.out).write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return captions


if __name__ == "__main__":
    main(sys.argv[1:])
