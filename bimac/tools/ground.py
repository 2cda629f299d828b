"""Noun grounding heat maps (BiMAC Fig. 2): where each noun of a caption lands on the image.

    bimac ground IMG "a red circle left of a blue square" --checkpoint DIR [--out-dir grounding/]

Nouns are found by spaCy (``--nouns``), mapped to token spans, mean-pooled over the text
tower's token outputs (Eq. 2) and scored against every raw ViT patch with BiMAC's grounding
head: ``S = sigmoid(scale * w·r + bias)`` (Eq. 7). The image goes to the model whole (resized to
its square input, aspect ratio not kept) so the patch grid covers all of it; each noun's grid is
upsampled back to the image's own size (bilinear), scaled to [0, 1] for display and blended over
the image with the ``jet`` colour map. One PNG per noun, the size of the input image, plus
``grounding.json`` with the raw scores (max, mean, best patch).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


def noun_extractor(pipeline: str):
    """spaCy nouns: ``auto`` = en_core_web_sm when installed, else the offline ``world`` ruler."""
    from bimac.data.text import NounExtractor

    if pipeline != "auto":
        return NounExtractor(pipeline)
    try:
        return NounExtractor("en_core_web_sm")
    except RuntimeError:
        logger.warning("en_core_web_sm is not installed: using the embedded world's noun ruler")
        return NounExtractor("world")


@torch.no_grad()
def grounding_maps(
    model, tokenizer, image: Image.Image, caption: str, nouns: list[tuple[int, int]]
) -> torch.Tensor:
    """``[N, grid, grid]`` sigmoid grounding scores of each noun's character span."""
    from bimac.data.tokenizer import token_spans
    from bimac.models.bimac import pool_spans

    size = model.config.image_size
    arr = np.array(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)
    pixels = model.normalize(torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous())
    ids, offsets = tokenizer.encode_with_offsets([caption])
    spans = token_spans(offsets[0], nouns)
    kept = [s if s is not None else (0, 0) for s in spans]
    if not any(s is not None for s in spans):
        raise ValueError("every noun was cut off by the tokenizer's context length")
    span_t = torch.tensor([kept], dtype=torch.long)
    mask = torch.tensor([[s is not None for s in spans]])
    _, token_embs = model.coca.text(ids.to(model.mean.device))
    _, _, patches = model.image_towers(pixels)
    r, w = model.ground_features(patches, pool_spans(token_embs, span_t, mask))
    scores = torch.sigmoid(
        model.grounding_logit_scale.exp() * w @ r.transpose(1, 2) + model.grounding_logit_bias
    )[0]
    g = model.config.grid
    return scores.view(-1, g, g).cpu()


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``heat [g, g]`` upsampled to the image's size, scaled to [0, 1], blended with ``jet``."""
    from matplotlib import colormaps

    w, h = image.size
    up = np.asarray(
        Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
    )
    lo, hi = float(up.min()), float(up.max())
    up = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    colour = colormaps["jet"](up)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * base + alpha * colour)))


def ground(
    checkpoint: str | Path,
    image_path: str | Path,
    caption: str,
    out_dir: str | Path,
    nouns: str = "auto",
    alpha: float = 0.5,
) -> list[Path]:
    """Write one heat-map PNG per noun (the image's size) and ``grounding.json``; returns PNGs."""
    from bimac.export_folder import load_tokenizer
    from bimac.models.bimac import BiMAC

    model = BiMAC.from_pretrained(checkpoint).eval()
    tokenizer = load_tokenizer(Path(checkpoint), model.config.context_length)
    found = noun_extractor(nouns)(caption)
    if not found:
        raise ValueError(f"no noun found in {caption!r} (--nouns {nouns}); try en_core_web_sm")
    image = Image.open(image_path)
    image.load()
    maps = grounding_maps(model, tokenizer, image, caption, [(n.start, n.end) for n in found])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem, paths, rows = Path(image_path).stem, [], []
    for i, (noun, heat) in enumerate(zip(found, maps)):
        path = out / f"{stem}_{i}_{re.sub(r'[^A-Za-z0-9_-]+', '_', noun.text)}.png"
        overlay(image, heat.numpy(), alpha).save(path)
        paths.append(path)
        flat = heat.flatten()
        rows.append(
            {
                "noun": noun.text,
                "start": noun.start,
                "end": noun.end,
                "png": path.name,
                "max": float(flat.max()),
                "mean": float(flat.mean()),
                "best_patch": int(flat.argmax()),
                "grid": model.config.grid,
            }
        )
    (out / "grounding.json").write_text(
        json.dumps(
            {"image": str(image_path), "caption": caption, "nouns": rows},
            ensure_ascii=False,
            indent=1,
        )
    )
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(
        prog="bimac ground",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("image", help="image file")
    ap.add_argument("caption", help="caption whose nouns are located")
    ap.add_argument("--checkpoint", required=True, help="BiMAC export directory")
    ap.add_argument(
        "--out-dir",
        default="grounding",
        help="folder for the PNGs and grounding.json (default: %(default)s)",
    )
    ap.add_argument(
        "--nouns",
        default="auto",
        help="spaCy pipeline for nouns: auto (en_core_web_sm if installed, else world), "
        "world, or a pipeline name (default: %(default)s)",
    )
    ap.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="heat-map opacity over the image (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    paths = ground(args.checkpoint, args.image, args.caption, args.out_dir, args.nouns, args.alpha)
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
