"""Noun grounding heat maps (BiMAC Fig. 2): where each noun of a caption lands on the image.

    bimac ground IMG "a red circle left of a blue square" --checkpoint DIR [--out-dir grounding/]

Nouns are found by spaCy (``--nouns``), mapped to token spans, mean-pooled over the text
tower's token outputs (Eq. 2) and scored against every raw ViT patch with BiMAC's grounding
head: ``S = sigmoid(scale * w·r + bias)`` (Eq. 7). The image goes to the model whole (resized to
its square input, aspect ratio not kept) so the patch grid covers all of it. Each noun's grid is
upsampled (bilinear) over the image shown with its shorter side at 448 pixels (world thumbnails
are 64), coloured on ONE absolute scale, S = 0 to 1 with the ``jet`` colour map, and blended over
the image: an object the model does not find stays blue, it is not stretched to a bright spot.
One PNG per noun with the noun, its best score and a colour bar, plus ``grounding.json`` with the
raw scores (max, mean, best patch) and the upright image's size.
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

from bimac.tools.images import BATCH_CONVENTION, ImageBatch, open_upright

logger = logging.getLogger(__name__)

DISPLAY_SIDE = 448  # pixels on the shorter side of a heat-map picture
COLOUR_MAP = "jet"


def noun_extractor(pipeline: str):
    """spaCy nouns: ``auto`` = en_core_web_sm when installed, else the offline ``world`` ruler."""
    from bimac.data.nouns import NounExtractor

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


def display_image(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """``image`` scaled (bicubic) so its shorter side is ``side`` pixels, aspect ratio kept."""
    w, h = image.size
    scale = side / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``heat [g, g]`` -> ``[h, w]`` for ``size = (w, h)``, bilinear, values not rescaled."""
    grid = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F")
    return np.asarray(grid.resize(size, Image.BILINEAR))


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB in [0, 1]: ``image`` blended with ``COLOUR_MAP`` of the scores ``heat [h, w]`` on the
    absolute scale 0..1 (a score has the same colour in every map)."""
    from matplotlib import colormaps

    colour = colormaps[COLOUR_MAP](np.clip(heat, 0.0, 1.0))[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (1 - alpha) * base + alpha * colour


def save_heat_map(
    image: Image.Image, heat: np.ndarray, noun: str, path: Path, alpha: float = 0.5
) -> None:
    """One noun's picture: the overlay, a title with the noun and its best score, a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    shown = display_image(image)
    w, h = shown.size
    g = heat.shape[0]
    row, col = divmod(int(heat.argmax()), g)
    fig, ax = plt.subplots(figsize=(w / 100 + 1.6, h / 100 + 0.8), dpi=100)
    ax.imshow(overlay(shown, upsample(heat, (w, h)), alpha))
    ax.plot((col + 0.5) * w / g, (row + 0.5) * h / g, "w+", markersize=14, markeredgewidth=2)
    ax.set_title(f'"{noun}"   max S = {heat.max():.2f} (+), mean {heat.mean():.2f}', fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), COLOUR_MAP), ax=ax, fraction=0.046)
    bar.set_label("grounding score S (absolute scale)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def ground(
    checkpoint: str | Path,
    image: Image.Image,
    name: str,
    caption: str,
    out_dir: str | Path,
    nouns: str = "auto",
    alpha: float = 0.5,
) -> list[Path]:
    """Heat maps of ``caption``'s nouns over ``image`` (file ``name``): one PNG per noun and
    ``grounding.json`` in ``out_dir``; returns the PNGs. ValueError when there is no noun."""
    from bimac.export_folder import load_tokenizer
    from bimac.models.bimac import BiMAC

    try:
        extractor = noun_extractor(nouns)
    except RuntimeError as exn:  # a spaCy pipeline that is not installed: the message says how
        raise ValueError(str(exn)) from None
    found = extractor(caption)
    if not found:
        hint = ""
        if extractor.pipeline == "world":
            hint = (
                " (it knows only the embedded world's shapes); for real English install "
                "en_core_web_sm: python -m spacy download en_core_web_sm"
            )
        raise ValueError(
            f"no noun found in {caption!r} by spaCy pipeline {extractor.pipeline!r}{hint}"
        )
    model = BiMAC.from_pretrained(checkpoint).eval()
    tokenizer = load_tokenizer(Path(checkpoint), model.config.context_length)
    maps = grounding_maps(model, tokenizer, image, caption, [(n.start, n.end) for n in found])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem, paths, rows = Path(name).stem, [], []
    for i, (noun, heat) in enumerate(zip(found, maps)):
        path = out / f"{stem}_{i}_{re.sub(r'[^A-Za-z0-9_-]+', '_', noun.text)}.png"
        save_heat_map(image, heat.numpy(), noun.text, path, alpha)
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
            {"image": name, "image_size": list(image.size), "caption": caption, "nouns": rows},
            ensure_ascii=False,
            indent=1,
        )
    )
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(
        prog="bimac ground",
        description=__doc__,
        epilog=BATCH_CONVENTION,
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
    batch = ImageBatch("bimac ground")
    paths = []
    for name, image in batch.read([args.image], read=open_upright):
        try:
            paths = ground(
                args.checkpoint, image, name, args.caption, args.out_dir, args.nouns, args.alpha
            )
        except ValueError as exn:
            raise SystemExit(f"bimac ground: {exn}") from None
    for p in paths:
        print(p)
    batch.finish()
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
