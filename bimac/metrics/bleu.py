"""BLEU-1..4 as in the COCO caption evaluation: pycocoevalcap's BleuScorer ("closest" reference
length), on whitespace-tokenised captions (see :mod:`bimac.metrics.text`)."""

from __future__ import annotations

from collections.abc import Sequence

from pycocoevalcap.bleu.bleu_scorer import BleuScorer


def bleu(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4
) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and per-candidate BLEU-1..n (``scores[k][i]``), COCO's definition."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if not candidates:
        return [0.0] * n, [[] for _ in range(n)]
    scorer = BleuScorer(n=n)
    for cand, refs in zip(candidates, references):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        scorer += (cand, list(refs))
    corpus, per = scorer.compute_score(option="closest", verbose=0)
    return [float(x) for x in corpus], [[float(x) for x in row] for row in per]
