"""Recall@k, classification and Winoground scores on hand-built matrices (exact values)."""

from __future__ import annotations

import pytest
import torch

from bimac.eval.classification import classification_metrics
from bimac.eval.probe import winoground_scores
from bimac.metrics.recall import (
    ranks_from_similarity,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
)


def test_ranks_hand_built_with_ties_counted_against_the_model():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.2],  # positive (col 0) strictly best -> rank 0
            [0.3, 0.3, 0.3, 0.3],  # constant row, positive col 1: 3 ties -> rank 3
            [0.8, 0.2, 0.7, 0.8],  # positives cols 2 and 3: best 0.8 ties with col 0 -> 1
        ]
    )
    pos = torch.zeros(3, 4, dtype=torch.bool)
    pos[0, 0] = pos[1, 1] = pos[2, 2] = pos[2, 3] = True
    ranks = ranks_from_similarity(sim, pos)
    assert ranks.tolist() == [0, 3, 1]
    assert recall_at_k(ranks, (1, 2, 5)) == {
        1: pytest.approx(100 / 3),
        2: pytest.approx(200 / 3),
        5: 100.0,
    }


def test_retrieval_metrics_hand_built_embeddings():
    # 2 images, 4 captions (2 each); caption 3 is closer to image 0 than to its own image 1
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.8, 0.2]])
    out = retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    # i2t: image 0 best text 0 (own) -> rank 0; image 1 best own text 2 (0.9) -> rank 0
    assert out["i2t_R@1"] == 100.0
    # t2i: texts 0,1,2 rank 0; text 3 prefers image 0 -> rank 1
    assert out["t2i_R@1"] == 75.0 and out["t2i_R@2"] == 100.0
    assert out["mTR"] == 100.0 and out["mIR"] == 87.5 and out["rsum"] == 375.0


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(37, 8, generator=g)
    txt = torch.randn(37 * 5, 8, generator=g).round()  # rounding creates ties
    labels = torch.arange(37).repeat_interleave(5)
    full = retrieval_ranks(img, txt, labels, max_bytes=1 << 30)
    tiny = retrieval_ranks(img, txt, labels, max_bytes=1)  # one query row per block
    mid = retrieval_ranks(img, txt, labels, max_bytes=5 * 37 * 12 * 3)
    for a, b, c in zip(full, tiny, mid):
        assert torch.equal(a, b) and torch.equal(a, c)
    sim = img @ txt.T
    assert torch.equal(
        full[0], ranks_from_similarity(sim, labels[None, :] == torch.arange(37)[:, None])
    )


def test_bad_retrieval_input():
    with pytest.raises(ValueError, match="out of range"):
        retrieval_ranks(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="positive"):
        ranks_from_similarity(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))


def test_classification_metrics_hand_built():
    logits = torch.tensor(
        [
            [5.0, 1.0, 0.0],  # label 0, top-1 hit
            [0.0, 1.0, 5.0],  # label 0, rank 2 -> top-1 miss, in top-5
            [1.0, 1.0, 0.0],  # label 1, tie with class 0 -> lower index wins -> miss
            [0.0, 2.0, 1.0],  # label 1, hit
        ]
    )
    out = classification_metrics(logits, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    assert out["top1"] == 50.0 and out["top2"] == 75.0
    assert out["mean_per_class_recall"] == 50.0
    unbalanced = classification_metrics(logits[[0, 1, 3]], torch.tensor([0, 0, 1]))
    assert unbalanced["mean_per_class_recall"] == 75.0  # (1/2 + 1/1) / 2
    assert unbalanced["top1"] == pytest.approx(200 / 3)


def test_winoground_scores_hand_built():
    sim = torch.tensor(
        [
            [[0.9, 0.1], [0.2, 0.8]],  # all correct
            [[0.9, 0.8], [0.5, 0.6]],  # text ok (0.9>0.5, 0.6>0.8? no) -> text fail; image ok
            [[0.5, 0.5], [0.1, 0.9]],  # tie c0: image fails; text ok
        ]
    )
    out = winoground_scores(sim)
    # text: ex0 yes, ex1 (0.9>0.5 and 0.6>0.8) no, ex2 (0.5>0.1 and 0.9>0.5) yes
    # image: ex0 yes, ex1 (0.9>0.8 and 0.6>0.5) yes, ex2 (0.5>0.5) no
    assert out == {
        "text_score": pytest.approx(200 / 3),
        "image_score": pytest.approx(200 / 3),
        "group_score": pytest.approx(100 / 3),
    }
