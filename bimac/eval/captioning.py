"""Captioning metrics on COCO-format files: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE, BERTScore.

    python -m bimac.eval.captioning --results RESULTS.json --annotations ANN.json \
        [--lang en|bn] [--metrics bleu,meteor,rouge,cider,spice] [--out scores.json]
    python -m bimac.eval.captioning --checkpoint CKPT --annotations ANN.json --images DIR \
        [--strategy beam --num-beams 3] [--results generated.json]

``RESULTS.json``: ``[{"image_id", "caption"}]``; ``ANN.json``: ``{"images": [{"id",
"file_name"}], "annotations": [{"image_id", "caption"}]}``; ``--annotations world:val:N`` uses
the embedded world's captions in ``--lang``. Images with results are scored; annotated images
without a result are counted (``missing_results``). English is PTB-tokenised as in the COCO
toolkit, Bengali normalised by :func:`bimac.metrics.text.normalize_bn`. SPICE is English only
and needs its Stanford models (otherwise reported ``unavailable``); BERTScore needs
``--bertscore-model`` (a hub name or local path) and ``--bertscore-layer`` unless default.
With ``--checkpoint`` captions are generated first (``bimac.generation``) from each image.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bimac.data.samples import image_chw, iter_samples, parse_world
from bimac.eval.common import report

logger = logging.getLogger(__name__)

ALL_METRICS = ("bleu", "meteor", "rouge", "cider", "spice", "bertscore")
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider", "spice")


def load_annotations(spec: str, lang: str = "en") -> tuple[dict, dict]:
    """``({image_id: [captions]}, {image_id: image file name or bytes})``."""
    world = parse_world(spec)
    refs: dict = defaultdict(list)
    sources: dict = {}
    if world:
        for s in iter_samples(spec):
            image_id = int(s["json"]["index"])
            refs[image_id] = list(s["json"][f"captions_{lang}"])
            sources[image_id] = s["jpg"]
        return dict(refs), sources
    data = json.loads(Path(spec).read_text(encoding="utf-8"))
    for ann in data["annotations"]:
        refs[ann["image_id"]].append(ann["caption"])
    sources = {img["id"]: img.get("file_name") for img in data.get("images", [])}
    return dict(refs), sources


def load_results(path: str | Path) -> dict:
    """``{image_id: caption}``; duplicate image ids are an error."""
    res: dict = {}
    for r in json.loads(Path(path).read_text(encoding="utf-8")):
        if r["image_id"] in res:
            raise ValueError(f"{path}: image_id {r['image_id']!r} has more than one result")
        res[r["image_id"]] = r["caption"]
    return res


def score_captions(
    results: dict,
    references: dict,
    lang: str = "en",
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    bertscore_model: str | None = None,
    bertscore_layer: int | None = None,
) -> dict:
    """Corpus scores of ``{image_id: caption}`` against ``{image_id: [captions]}``."""
    from bimac.metrics.text import tokenize_groups

    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {ALL_METRICS}")
    extra = [k for k in results if k not in references]
    if extra:
        raise ValueError(f"{len(extra)} results have no annotations, e.g. image_id {extra[0]!r}")
    ids = list(results)
    if not ids:
        raise ValueError("no results to score")
    missing = len(set(references) - set(results))
    if missing:
        logger.warning(
            "%d annotated images have no result; scoring the %d that do", missing, len(ids)
        )
    raw_refs = {i: references[i] for i in ids}
    refs = tokenize_groups(raw_refs, lang)
    cands = tokenize_groups({i: [results[i]] for i in ids}, lang)
    c = [cands[i][0] for i in ids]
    r = [refs[i] for i in ids]
    out: dict = {"images": len(ids), "missing_results": missing, "lang": lang}
    if "bleu" in metrics:
        from bimac.metrics.bleu import bleu

        corpus, _ = bleu(c, r)
        out.update({f"BLEU-{k + 1}": 100 * v for k, v in enumerate(corpus)})
    if "meteor" in metrics:
        from bimac.metrics.meteor import Meteor

        out["METEOR"] = 100 * Meteor.shared(lang).score(c, r)[0]
    if "rouge" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        scorer = Rouge()
        out["ROUGE-L"] = 100 * float(np.mean([scorer.calc_score([x], y) for x, y in zip(c, r)]))
    if "cider" in metrics:
        from bimac.metrics.cider import cider_d

        out["CIDEr-D"] = 100 * cider_d(c, r)[0]
    if "spice" in metrics:
        from bimac.metrics.spice import spice, spice_unavailable_reason

        reason = "English only" if lang != "en" else spice_unavailable_reason()
        if reason:
            out["SPICE"] = "unavailable"
            out["SPICE_reason"] = reason
        else:
            out["SPICE"] = 100 * spice(c, r)[0]
    if "bertscore" in metrics:
        from bimac.metrics.bertscore import bertscore

        bs = bertscore(
            [results[i] for i in ids],
            [raw_refs[i] for i in ids],
            lang=lang,
            model=bertscore_model,
            layer=bertscore_layer,
        )
        out["BERTScore-F1"] = 100 * bs["F1"]
        out["BERTScore_note"] = bs["note"] or "rescaled with baseline"
    return out


@torch.no_grad()
def generate_captions(
    checkpoint: str | Path,
    sources: dict,
    image_dir: str | None,
    strategy: str = "greedy",
    num_beams: int = 1,
    max_new_tokens: int = 20,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict:
    """``{image_id: caption}`` generated by a BiMAC export's caption decoder."""
    from bimac.eval.common import bimac_encoder
    from bimac.generation import CocaAdapter, GenerationConfig, generate

    enc = bimac_encoder(checkpoint, device)
    model, tok = enc.model, enc.tokenizer
    adapter = CocaAdapter(
        model.coca,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=model.config.pad_id,
        tokenizer=tok,
    )
    cfg = GenerationConfig(
        strategy=strategy,
        num_beams=num_beams,
        max_new_tokens=min(max_new_tokens, model.config.context_length - 1),
    )
    ids = list(sources)
    out: dict = {}
    for a in range(0, len(ids), batch_size):
        chunk = ids[a : a + batch_size]
        imgs = []
        for i in chunk:
            src = sources[i]
            if isinstance(src, str):
                if not image_dir:
                    raise ValueError("--images DIR is needed to find the annotation images")
                src = Path(image_dir) / src
            imgs.append(image_chw(src, model.config.image_size))
        pixels = model.normalize(torch.from_numpy(np.stack(imgs)))
        memory = model.image_towers(pixels)[1]
        gen = generate(adapter, memory, cfg)
        texts = gen.texts if gen.texts is not None else tok.decode(gen.ids)
        out.update({i: t.strip() for i, t in zip(chunk, texts)})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--annotations", required=True, help="COCO captions JSON or world:SPLIT:N")
    ap.add_argument("--results", help="results JSON to score (written here with --checkpoint)")
    ap.add_argument("--checkpoint", help="BiMAC export: generate the captions first")
    ap.add_argument("--images", help="image folder for the annotation file names")
    ap.add_argument("--lang", default="en", choices=["en", "bn"])
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"any of {ALL_METRICS}")
    ap.add_argument("--bertscore-model", default=None)
    ap.add_argument("--bertscore-layer", type=int, default=None)
    ap.add_argument("--strategy", default="greedy", choices=["greedy", "beam"])
    ap.add_argument("--num-beams", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON file for the scores")
    args = ap.parse_args(argv)
    refs, sources = load_annotations(args.annotations, args.lang)
    if args.checkpoint:
        beams = args.num_beams if args.strategy == "beam" else 1
        results = generate_captions(
            args.checkpoint,
            sources,
            args.images,
            args.strategy,
            beams,
            args.max_new_tokens,
            args.batch_size,
            args.device,
        )
        if args.results:
            rows = [{"image_id": k, "caption": v} for k, v in results.items()]
            Path(args.results).write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    elif args.results:
        results = load_results(args.results)
    else:
        ap.error("give --results to score, or --checkpoint to generate")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    scores = score_captions(
        results, refs, args.lang, metrics, args.bertscore_model, args.bertscore_layer
    )
    scores["annotations"] = args.annotations
    report(scores, args.out, "Captioning")
    return scores


if __name__ == "__main__":
    main()
