"""BLEU-1..4 against pycocoevalcap's Bleu and sacrebleu (matching settings), 1e-6 tolerance."""

from __future__ import annotations

import random

import numpy as np
import sacrebleu
from pycocoevalcap.bleu.bleu import Bleu

from bimac.metrics.bleu import bleu


def _data(seed: int, n: int, n_refs: int):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(6)]  # small: every order has matches

    def sent():
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))

    return [sent() for _ in range(n)], [[sent() for _ in range(n_refs)] for _ in range(n)]


def test_equals_pycocoevalcap():
    cands, refs = _data(0, 200, 5)
    corpus, per = Bleu(4).compute_score(
        {i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)}, verbose=0
    )
    ours_corpus, ours_per = bleu(cands, refs)
    np.testing.assert_allclose(ours_corpus, corpus, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours_per, per, rtol=0, atol=1e-12)


def test_equals_sacrebleu_with_matching_settings():
    # sacrebleu: no tokenisation, no smoothing, closest reference length (ties -> shorter,
    # as pycocoevalcap). pycocoevalcap adds 1e-9/1e-15 guards, hence the tolerance.
    cands, refs = _data(1, 300, 4)
    ours, _ = bleu(cands, refs)
    streams = [list(x) for x in zip(*refs)]
    for k in range(1, 5):
        metric = sacrebleu.metrics.BLEU(
            tokenize="none", smooth_method="none", max_ngram_order=k, effective_order=False
        )
        assert abs(metric.corpus_score(cands, streams).score / 100 - ours[k - 1]) < 1e-6
