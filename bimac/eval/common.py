"""What the evaluation scripts share: model loading, embedding, reports.

Models: a BiMAC export (``--checkpoint DIR``, through ``BiMAC.from_pretrained`` and the tokenizer
saved beside it) or an open_clip model for comparison (``--open-clip NAME --pretrained TAG|FILE``).
Both become an :class:`Encoder` with ``images(uint8 [B, 3, S, S]) -> [B, D]`` and
``texts(list[str]) -> [B, D]`` (L2-normalised), and ``image_size``.

Data specs (``bimac.data.samples``): ``world:SPLIT[:N]`` renders the embedded world in memory (no
files), anything else is a WebDataset shard pattern (``dir/{00000..00003}.tar``) read with
training's tar reader, skips counted by reason, unless a script says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bimac.data.loader import SkipCounter
from bimac.data.samples import image_chw

logger = logging.getLogger(__name__)


@dataclass
class Encoder:
    """Normalised image/text embeddings from some model, in batches."""

    images: Callable[[torch.Tensor], torch.Tensor]
    texts: Callable[[list[str]], torch.Tensor]
    image_size: int
    name: str
    model: object = None
    tokenizer: object = None


def bimac_encoder(checkpoint: str | Path, device: str = "cpu") -> Encoder:
    """Encoder of a BiMAC export directory (``model.safetensors``, ``config.yaml``, tokenizer)."""
    from bimac.export_folder import load_tokenizer
    from bimac.models.bimac import BiMAC

    directory = Path(checkpoint)
    model = BiMAC.from_pretrained(directory).to(device).eval()
    tok = load_tokenizer(directory, model.config.context_length)
    return Encoder(
        images=lambda x: model.encode_image(x.to(device)).float(),
        texts=lambda t: model.encode_text(tok.encode(list(t)).to(device)).float(),
        image_size=model.config.image_size,
        name=str(directory),
        model=model,
        tokenizer=tok,
    )


def open_clip_encoder(name: str, pretrained: str | None, device: str = "cpu") -> Encoder:
    """Encoder of an open_clip model (``pretrained``: a tag of ``name`` or a checkpoint file)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model = model.to(device).eval()
    tok = open_clip.get_tokenizer(name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = torch.tensor(
        getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    ).view(1, 3, 1, 1)
    std = torch.tensor(
        getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    ).view(1, 3, 1, 1)

    def images(x: torch.Tensor) -> torch.Tensor:
        pixels = ((x.float() / 255.0 - mean) / std).to(device)
        return model.encode_image(pixels, normalize=True).float()

    return Encoder(
        images=images,
        texts=lambda t: model.encode_text(tok(list(t)).to(device), normalize=True).float(),
        image_size=size,
        name=f"open_clip:{name}:{pretrained}",
        model=model,
        tokenizer=tok,
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` | ``--open-clip/--pretrained``, ``--device``, ``--batch-size``, ``--out``."""
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="BiMAC export directory (save_pretrained output)")
    g.add_argument("--open-clip", help="open_clip model name, for comparison (e.g. ViT-B-32)")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="JSON file for the numbers")


def encoder_from_args(args: argparse.Namespace) -> Encoder:
    if args.checkpoint:
        return bimac_encoder(args.checkpoint, args.device)
    return open_clip_encoder(args.open_clip, args.pretrained, args.device)


@torch.no_grad()
def embed_images(
    encoder: Encoder,
    sources: Iterable[bytes | str | Path],
    batch_size: int,
    total: int | None = None,
) -> torch.Tensor:
    """Embeddings ``[N, D]`` (CPU float32) of images given as bytes or paths."""
    out, batch = [], []
    for src in tqdm(sources, total=total, desc="images", leave=False):
        batch.append(image_chw(src, encoder.image_size))
        if len(batch) == batch_size:
            out.append(encoder.images(torch.from_numpy(np.stack(batch))).cpu())
            batch = []
    if batch:
        out.append(encoder.images(torch.from_numpy(np.stack(batch))).cpu())
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)


@torch.no_grad()
def embed_texts(encoder: Encoder, texts: list[str], batch_size: int) -> torch.Tensor:
    """Embeddings ``[N, D]`` (CPU float32) of texts."""
    chunks = range(0, len(texts), batch_size)
    out = [
        encoder.texts(texts[i : i + batch_size]).cpu()
        for i in tqdm(chunks, desc="texts", leave=False)
    ]
    if not out:
        raise ValueError("no texts to embed")
    return torch.cat(out)


def note_skips(results: dict, counter: SkipCounter) -> None:
    """Put what was skipped into ``results`` (``skipped`` total, ``skipped_by_reason``) and say
    it in one log line."""
    by_reason = counter.as_dict()
    results["skipped"] = sum(by_reason.values())
    results["skipped_by_reason"] = by_reason
    if by_reason:
        logger.warning("skipped %d samples: %s", results["skipped"], by_reason)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (numbers with 2 decimals)."""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict, out: str | None, title: str) -> None:
    """Print ``results`` (flat dict of numbers/strings) as a markdown table; write JSON to ``out``."""
    print(f"### {title}\n")
    scalars = {
        k: v for k, v in results.items() if isinstance(v, (int, float, str)) and v is not None
    }
    print(markdown_table([scalars]))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
        logger.info("wrote %s", out)
