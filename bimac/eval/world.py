"""All four evaluations of a BiMAC export on the embedded world, as one table (for ``make demo``).

    python -m bimac.eval.world --checkpoint CKPT [--n 200] [--out world_eval.json]

Retrieval on ``world:retrieval:N``, zero-shot classification on ``world:cls_shape:N``, greedy
captioning scored with BLEU-4 / CIDEr-D on ``world:val:N`` (English), and the probe on
``world:probe:N/2`` pairs. Captioning metrics that need Java (PTB, METEOR) are used when Java
is present; otherwise captions are lower-cased and split on whitespace and the row says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bimac.eval import captioning, classification, probe, retrieval
from bimac.eval.common import bimac_encoder, markdown_table
from bimac.metrics.text import java_available


def evaluate_world(
    checkpoint: str | Path, n: int = 200, device: str = "cpu"
) -> tuple[list[dict], dict[str, dict]]:
    """Rows ``{task, metric, value}`` of the four evaluations, and each evaluation's full numbers
    (what ``--out`` writes, in the layout ``bimac report`` reads)."""
    enc = bimac_encoder(checkpoint, device)
    rows: list[dict] = []
    images, caps = retrieval.shard_pairs(f"world:retrieval:{n}")
    r = retrieval.evaluate(enc, images, caps)
    rows += [
        {"task": "retrieval", "metric": k, "value": r[k]}
        for k in ("i2t_R@1", "t2i_R@1", "mTR", "mIR")
    ]
    from bimac.data.world import class_names

    images, labels = classification.shard_items(f"world:cls_shape:{n}")
    c = classification.evaluate(
        enc, images, labels, class_names("cls_shape"), classification.world_templates("cls_shape")
    )
    rows += [
        {"task": "zero-shot cls (shape)", "metric": k, "value": c[k]}
        for k in ("top1", "top5", "chance_top1")
    ]
    refs, sources = captioning.load_annotations(f"world:val:{n}", "en")
    results = captioning.generate_captions(checkpoint, sources, None, device=device)
    if java_available():
        s = captioning.score_captions(results, refs, "en", ("bleu", "cider"))
        note = "PTB-tokenised"
    else:
        from bimac.metrics.bleu import bleu
        from bimac.metrics.cider import cider_d

        ids = list(results)
        cands = [" ".join(results[i].lower().split()) for i in ids]
        rs = [[" ".join(x.lower().split()) for x in refs[i]] for i in ids]
        s = {"BLEU-4": 100 * bleu(cands, rs)[0][3], "CIDEr-D": 100 * cider_d(cands, rs)[0]}
        note = "no Java: whitespace-tokenised"
    rows += [
        {"task": f"captioning ({note})", "metric": k, "value": s[k]} for k in ("BLEU-4", "CIDEr-D")
    ]
    images, texts, kinds = probe.shard_examples(f"world:probe:{max(1, n // 2)}")
    p = probe.evaluate(enc, images, texts, kinds)
    rows += [
        {"task": "probe", "metric": k, "value": p[k]}
        for k in ("text_score", "image_score", "group_score")
    ]
    details = {"retrieval": r, "zero_shot_shape": c, "captioning": s, "probe": p}
    return rows, details


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=200, help="samples per split (probe: n/2 pairs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows, details = evaluate_world(args.checkpoint, args.n, args.device)
    print("### Embedded-world evaluation\n")
    print(markdown_table(rows, ["task", "metric", "value"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, **details}, indent=2))
    return rows


if __name__ == "__main__":
    main()
