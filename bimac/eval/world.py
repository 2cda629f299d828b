"""The evaluations of a BiMAC export on the embedded world, as one table (``make demo``, the tables).

    python -m bimac.eval.world --checkpoint CKPT [--n 200] [--retrieval-n N] [--cls-n N]
        [--probe-pairs N] [--caption-n N (0: skip)] [--variant binding] [--out world_eval.json]

Retrieval on ``world:retrieval:N`` (R@1/5/10 both ways, mTR, mIR), zero-shot classification on
``world:cls_shape:N`` and ``world:cls_colour_shape:N``, the probe on ``world:probe:P`` pairs
(text / image / group score), greedy captioning scored with BLEU-4 / CIDEr-D on ``world:val:N``
(English; skipped with ``--caption-n 0``), and the training run's pointing game (the last logged
``pointing_game`` of the ``summary.json`` beside the export, absent when the run did not train
grounding). ``--variant`` renders the retrieval, classification and captioning splits of that
world variant (:data:`bimac.data.world.VARIANTS`; the probe split is the same in all).
Captioning metrics that need Java (PTB, METEOR) are used when Java is present; otherwise captions
are lower-cased and split on whitespace and the row says so.

``--out`` writes the rows, each evaluation's full numbers (the layout ``bimac report`` reads) and
``metrics``: the table's numbers under flat keys (``retrieval/mTR``, ``cls_shape/top1``,
``probe/group_score``, ``pointing_game``, ...).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from bimac.data.world import VARIANTS, class_names
from bimac.eval import captioning, classification, probe, retrieval
from bimac.eval.common import bimac_encoder, markdown_table
from bimac.metrics.text import java_available

RETRIEVAL_KEYS = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)) + ("mTR", "mIR")
CLASSIFICATION_SPLITS = {
    "cls_shape": "zero_shot_shape",
    "cls_colour_shape": "zero_shot_colour_shape",
}
PROBE_KEYS = ("text_score", "image_score", "group_score")


@dataclass(frozen=True)
class WorldEvalSizes:
    """Samples per split (``caption = 0`` skips captioning, the slowest part)."""

    retrieval: int = 200
    classification: int = 200  # each of cls_shape and cls_colour_shape
    probe_pairs: int = 100
    caption: int = 200

    @classmethod
    def all(cls, n: int) -> WorldEvalSizes:
        """``n`` samples per split, ``n / 2`` probe pairs (what ``--n`` alone gives)."""
        return cls(n, n, max(1, n // 2), n)


def pointing_game(checkpoint: str | Path) -> float | None:
    """The last logged pointing game of the run that wrote the export (``summary.json`` in the
    export's folder or one of its two parents), or None when there is none (grounding off)."""
    start = Path(checkpoint).resolve()
    for folder in (start, *list(start.parents)[:2]):
        summary = folder / "summary.json"
        if summary.is_file():
            return json.loads(summary.read_text()).get("final_metrics", {}).get("pointing_game")
    return None


def _captioning(checkpoint, n: int, variant: str, device: str) -> tuple[str, dict]:
    refs, sources = captioning.load_annotations(f"world:val:{n}:{variant}", "en")
    results = captioning.generate_captions(checkpoint, sources, None, device=device)
    if java_available():
        return "PTB-tokenised", captioning.score_captions(results, refs, "en", ("bleu", "cider"))
    from bimac.metrics.bleu import bleu
    from bimac.metrics.cider import cider_d

    ids = list(results)
    cands = [" ".join(results[i].lower().split()) for i in ids]
    rs = [[" ".join(x.lower().split()) for x in refs[i]] for i in ids]
    scores = {"BLEU-4": 100 * bleu(cands, rs)[0][3], "CIDEr-D": 100 * cider_d(cands, rs)[0]}
    return "no Java: whitespace-tokenised", scores


def evaluate_world(
    checkpoint: str | Path,
    n: int = 200,
    device: str = "cpu",
    sizes: WorldEvalSizes | None = None,
    variant: str = "default",
) -> tuple[list[dict], dict[str, dict]]:
    """Rows ``{task, metric, value}`` of the evaluations, and each evaluation's full numbers plus
    ``metrics`` (flat keys; what ``--out`` writes). ``sizes`` overrides ``n`` per split."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown world variant {variant!r}; one of {VARIANTS}")
    sizes = sizes or WorldEvalSizes.all(n)
    enc = bimac_encoder(checkpoint, device)
    rows: list[dict] = []
    flat: dict[str, float] = {}
    details: dict[str, dict] = {}

    def add(task: str, prefix: str, numbers: dict, keys) -> None:
        for k in keys:
            rows.append({"task": task, "metric": k, "value": numbers[k]})
            flat[f"{prefix}/{k}"] = numbers[k]

    images, caps = retrieval.shard_pairs(f"world:retrieval:{sizes.retrieval}:{variant}")
    details["retrieval"] = retrieval.evaluate(enc, images, caps)
    add("retrieval", "retrieval", details["retrieval"], RETRIEVAL_KEYS)
    for split, name in CLASSIFICATION_SPLITS.items():
        images, labels = classification.shard_items(
            f"world:{split}:{sizes.classification}:{variant}"
        )
        details[name] = classification.evaluate(
            enc, images, labels, class_names(split, variant), classification.world_templates(split)
        )
        add(f"zero-shot cls ({split[4:]})", split, details[name], ("top1", "top5", "chance_top1"))
    if sizes.caption:
        note, details["captioning"] = _captioning(checkpoint, sizes.caption, variant, device)
        add(f"captioning ({note})", "captioning", details["captioning"], ("BLEU-4", "CIDEr-D"))
    images, texts, kinds = probe.shard_examples(f"world:probe:{sizes.probe_pairs}")
    details["probe"] = probe.evaluate(enc, images, texts, kinds)
    add("probe", "probe", details["probe"], PROBE_KEYS)
    pg = pointing_game(checkpoint)
    if pg is not None:
        rows.append({"task": "grounding (training)", "metric": "pointing_game", "value": pg})
        flat["pointing_game"] = pg
    details["metrics"] = flat
    return rows, details


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=200, help="samples per split (probe: n/2 pairs)")
    ap.add_argument("--retrieval-n", type=int, default=None, help="retrieval images (default n)")
    ap.add_argument("--cls-n", type=int, default=None, help="images per cls split (default n)")
    ap.add_argument("--probe-pairs", type=int, default=None, help="probe pairs (default n/2)")
    ap.add_argument("--caption-n", type=int, default=None, help="val images; 0 skips (default n)")
    ap.add_argument("--variant", default="default", choices=VARIANTS, help="world variant")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    base = WorldEvalSizes.all(args.n)
    given = {
        "retrieval": args.retrieval_n,
        "classification": args.cls_n,
        "probe_pairs": args.probe_pairs,
        "caption": args.caption_n,
    }
    sizes = WorldEvalSizes(**{k: getattr(base, k) if v is None else v for k, v in given.items()})
    rows, details = evaluate_world(args.checkpoint, args.n, args.device, sizes, args.variant)
    print("### Embedded-world evaluation\n")
    print(markdown_table(rows, ["task", "metric", "value"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, **details}, indent=2))
    return rows


if __name__ == "__main__":
    main()
