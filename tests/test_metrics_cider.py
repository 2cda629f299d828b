"""CIDEr-D against pycocoevalcap's Cider (the CIDEr-D formula), tolerance 1e-9 absolute."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs

from bimac.metrics.cider import CiderD, cider_d

WORDS = [f"w{i}" for i in range(40)]


def _sentence(rng: random.Random) -> str:
    length = rng.choice([0, 0, 1, 2, 3, 5, 8, 12, 16])
    pool = WORDS[: rng.choice([3, 8, 40])]  # small pools give repeated n-grams and clipping
    return " ".join(rng.choice(pool) for _ in range(length))


def _caption_sets(seed: int, count: int):
    rng = random.Random(seed)
    made = 0
    while made < count:
        n = rng.randint(1, 10)
        cands = [_sentence(rng) for _ in range(n)]
        refs = [[_sentence(rng) for _ in range(rng.randint(1, 7))] for _ in range(n)]
        if not any(r for rs in refs for r in rs):
            continue  # pycocoevalcap cannot score a corpus whose references are all empty
        made += 1
        yield cands, refs


def test_equals_pycocoevalcap_on_520_random_sets():
    n_empty = 0
    for cands, refs in _caption_sets(seed=0, count=520):
        n_empty += sum(c == "" for c in cands)
        mean, scores = Cider().compute_score(
            {i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)}
        )
        ours_mean, ours = cider_d(cands, refs)
        np.testing.assert_allclose(ours, scores, rtol=0, atol=1e-9)
        assert abs(ours_mean - mean) < 1e-9
    assert n_empty > 50  # the generator did produce empty candidates


class _CorpusCider(CiderScorer):
    """pycocoevalcap's scorer with document frequencies taken from a separate corpus."""

    def __init__(self, corpus):
        super().__init__()
        self.corpus = corpus

    def compute_doc_freq(self):
        self.document_frequency = defaultdict(float)
        for refs in map(cook_refs, self.corpus):
            for ngram in {g for ref in refs for g in ref}:
                self.document_frequency[ngram] += 1


def test_corpus_document_frequencies_match_reference_with_unseen_words():
    rng = random.Random(1)
    ids = {w: 3 * i + 7 for i, w in enumerate(WORDS)}
    for _ in range(60):
        n = rng.randint(2, 8)
        corpus = [[_sentence(rng) for _ in range(rng.randint(1, 5))] for _ in range(n)]
        corpus[0].append("w0 w1 w2")  # never an all-empty corpus
        # reference ref_len = log(#scored images), so the corpus has the same number of images
        cands = [_sentence(rng) + " unseen" for _ in range(n)]
        refs = [[_sentence(rng) for _ in range(rng.randint(1, 7))] for _ in range(n)]
        ref = _CorpusCider(corpus)
        for c, r in zip(cands, refs):
            ref += (c, r)
        ref.compute_doc_freq()
        expected = ref.compute_cider()
        np.testing.assert_allclose(CiderD(corpus).score(cands, refs), expected, atol=1e-9)
        # the same through integer token ids (arrays, tensors and lists)
        ids["unseen"] = 10_000
        enc = [[ids[w] for w in s.split()] for s in cands]
        got = CiderD([[[ids[w] for w in s.split()] for s in r] for r in corpus]).score(
            [torch.tensor(e, dtype=torch.long) for e in enc],
            [[np.array([ids[w] for w in s.split()], dtype=np.int64) for s in r] for r in refs],
        )
        np.testing.assert_allclose(got, expected, atol=1e-9)


def test_token_lists_equal_strings_and_repeated_samples_share_refs():
    refs = [["a cat on a mat", "the cat sits"], ["a red dog runs", "dog running fast"]]
    scorer = CiderD(refs)
    samples = ["a cat sits on a mat", "cat", "a dog runs fast", "red dog"]
    shared = [refs[0], refs[0], refs[1], refs[1]]
    as_strings = scorer.score(samples, shared)
    as_tokens = scorer.score([s.split() for s in samples], shared)
    np.testing.assert_array_equal(as_strings, as_tokens)
    assert as_strings[0] > as_strings[1] and as_strings.shape == (4,)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="no references"):
        cider_d(["a b"], [[]])
    with pytest.raises(ValueError, match="reference sets"):
        cider_d(["a b", "c"], [["a b"]])
    with pytest.raises(TypeError, match="token ids"):
        CiderD([["a b c"]]).score([[1, 2, 3]], [["a b c"]])
    with pytest.raises(TypeError, match="mix"):
        cider_d(["a b"], [[[1, 2]]])


def test_large_vocabulary_uses_compacted_keys_and_still_matches():
    # 20,000 distinct tokens: 4-gram keys times the sentence count overflow int64, so the
    # core compacts the keys first (np.unique) for that order.
    rng = np.random.default_rng(3)
    vocab = [f"t{i}" for i in range(20_000)]
    words = iter(rng.permutation(vocab).tolist() * 2)

    def sent(k: int) -> str:
        return " ".join(next(words) for _ in range(k))

    refs = [[sent(12) for _ in range(5)] for _ in range(300)]
    cands = [r[0].split()[:6] for r in refs]  # shares n-grams with its first reference
    cands = [" ".join(c) for c in cands]
    _, expected = Cider().compute_score(
        dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)}
    )
    np.testing.assert_allclose(cider_d(cands, refs)[1], expected, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="too many"):
        cider_d(["a"], [[" ".join(f"w{i}" for i in range(60_000))]])
