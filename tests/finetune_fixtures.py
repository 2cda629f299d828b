"""Embedded-world shards, tokenizer and random-weight BiMAC exports for the fine-tuning, CLI and
interchange tests (built offline, small enough for 2 CPU cores)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import torch
from PIL import Image

from bimac.models.bimac import BiMAC, load_model_config

MODEL_YAML = "configs/model/tiny.yaml"
# a smaller model than configs/model/tiny.yaml: same code paths, a fraction of the CPU time
SMALL = [
    "image_size=32",
    "vision_width=64",
    "text_width=64",
    "vision_layers=1",
    "text_layers=1",
    "decoder_layers=1",
    "embed_dim=32",
    "patch_decoder_layers=1",
    "patch_decoder_width=32",
    "grounding_dim=16",
    "context_length=16",
]


def world_shards(root: Path, n: int = 48, size: int = 64) -> tuple[Path, Path]:
    """One training shard of the embedded world and its tokenizer: ``(tar, tokenizer.json)``."""
    from shards.world import build

    tar = build(root, "train", n, size, seed=0, shard_size=n)[0]
    return tar, root / "tokenizer.json"


def random_export(out: Path, tokenizer: Path, overrides: list[str] = (), seed: int = 0) -> Path:
    """A BiMAC export directory (``save_pretrained``) of a randomly initialised model."""
    torch.manual_seed(seed)
    model = BiMAC(load_model_config(MODEL_YAML, list(overrides)))
    model.save_pretrained(out)
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


def world_image(path: Path, size: tuple[int, int] = (120, 90), index: int = 0) -> Path:
    """A non-square embedded-world image file (``size`` = width, height)."""
    from bimac.data.world import make_sample

    sample = make_sample(0, "val", index, 96)
    Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize(size).save(path)
    return path


def export_embeddings(export, images: list[bytes], texts: list[str]):
    """L2-normalised image and text embeddings straight from the export (model + tokenizer), with
    the images through the shared decoder: the numbers the evaluations must reproduce."""
    from bimac.data.samples import image_chw
    from bimac.export_folder import load_tokenizer
    from bimac.models.bimac import BiMAC

    model = BiMAC.from_pretrained(export).eval()
    tok = load_tokenizer(export, model.config.context_length)
    size = model.config.image_size
    with torch.no_grad():
        img = model.encode_image(
            torch.stack([torch.from_numpy(image_chw(b, size)) for b in images])
        )
        txt = model.encode_text(tok.encode(texts))
    return img, txt
