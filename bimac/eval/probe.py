"""Winoground-style compositional probe: text, image and group scores (Thrush et al. 2022).

    python -m bimac.eval.probe --checkpoint CKPT --data world:probe:N [--out p.json]

Each example has two images and two captions, caption i describing image i. With ``s(c, i)``:
text score: ``s(c0,i0) > s(c1,i0)`` and ``s(c1,i1) > s(c0,i1)``; image score:
``s(c0,i0) > s(c0,i1)`` and ``s(c1,i1) > s(c1,i0)``; group: both. Ties fail (strict ``>``).

``--data``: the embedded world's probe split (``world:probe:N``, N pairs) or shards in the same
format (``json.probe = {pair, member, kind}``, caption ``json.captions_en[0]`` or ``txt``), or a
Winoground-style JSONL (``image_0``, ``image_1``, ``caption_0``, ``caption_1``) with ``--images``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
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


def winoground_scores(sim: torch.Tensor) -> dict[str, float]:
    """``sim [N, 2, 2]`` with ``sim[n, c, i] = s(caption c, image i)`` -> scores in %."""
    if sim.ndim != 3 or sim.shape[1:] != (2, 2):
        raise ValueError(f"expected similarities [N, 2, 2], got {tuple(sim.shape)}")
    c0i0, c0i1, c1i0, c1i1 = sim[:, 0, 0], sim[:, 0, 1], sim[:, 1, 0], sim[:, 1, 1]
    text = (c0i0 > c1i0) & (c1i1 > c0i1)
    image = (c0i0 > c0i1) & (c1i1 > c1i0)
    return {
        "text_score": 100.0 * float(text.float().mean()),
        "image_score": 100.0 * float(image.float().mean()),
        "group_score": 100.0 * float((text & image).float().mean()),
    }


def shard_examples(spec: str) -> tuple[list, list[str], list[str]]:
    """Images, captions (index 2n + member) and kinds of complete pairs."""
    pairs: dict[int, dict[int, tuple[bytes, str]]] = defaultdict(dict)
    kinds: dict[int, str] = {}
    for s in iter_samples(spec):
        meta = s.get("json") or {}
        probe = meta.get("probe")
        if not probe:
            raise ValueError(f"sample {s.get('__key__')} has no json.probe {{pair, member}}")
        caption = (meta.get("captions_en") or [s.get("txt")])[0]
        pairs[probe["pair"]][probe["member"]] = (s["jpg"], caption)
        kinds[probe["pair"]] = probe.get("kind", "all")
    images, captions, kind_list = [], [], []
    for p in sorted(pairs):
        if set(pairs[p]) != {0, 1}:
            raise ValueError(f"probe pair {p} is incomplete (members {sorted(pairs[p])})")
        for m in (0, 1):
            images.append(pairs[p][m][0])
            captions.append(pairs[p][m][1])
        kind_list.append(kinds[p])
    return images, captions, kind_list


def jsonl_examples(path: str, image_dir: str) -> tuple[list, list[str], list[str]]:
    images, captions, kinds = [], [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        ex = json.loads(line)
        for m in (0, 1):
            name = ex[f"image_{m}"]
            images.append(Path(image_dir) / (name if Path(name).suffix else f"{name}.png"))
            captions.append(ex[f"caption_{m}"])
        kinds.append(ex.get("collapsed_tag", "all"))
    return images, captions, kinds


def evaluate(encoder: Encoder, images, captions, kinds, batch_size: int = 256) -> dict:
    img = embed_images(encoder, images, batch_size, total=len(images))
    img = img.view(len(kinds), 2, -1)
    txt = embed_texts(encoder, captions, batch_size).view(len(kinds), 2, -1)
    sim = torch.einsum("ncd,nid->nci", txt, img)  # sim[n, c, i] = <caption c, image i>
    out = winoground_scores(sim)
    for kind in sorted(set(kinds)):
        mask = torch.tensor([k == kind for k in kinds])
        for name, value in winoground_scores(sim[mask]).items():
            out[f"{kind}_{name}"] = value
    out.update(examples=len(kinds), model=encoder.name)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(ap)
    ap.add_argument("--data", required=True, help="world:probe:N, shards, or Winoground JSONL")
    ap.add_argument("--images", help="image folder for a JSONL")
    args = ap.parse_args(argv)
    if args.data.endswith(".jsonl"):
        if not args.images:
            ap.error("--images is required with a JSONL")
        images, captions, kinds = jsonl_examples(args.data, args.images)
    else:
        images, captions, kinds = shard_examples(args.data)
    results = evaluate(encoder_from_args(args), images, captions, kinds, args.batch_size)
    results["data"] = args.data
    report(results, args.out, "Compositional probe (Winoground-style)")
    return results


if __name__ == "__main__":
    main()
