"""BiMAC objectives (bimac.losses): reference libraries, hand computations, gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from bimac_dist_worker import rank_worker, unit
from open_clip.loss import ClipLoss, CoCaLoss

from bimac.losses import (
    caption_loss,
    contrastive_loss,
    grounding_loss,
    pointing_game,
    reconstruction_loss,
    reward_weights,
    scst_loss,
)
from bimac.matching import hungarian_match

# -- MCL -------------------------------------------------------------------------------------


def test_contrastive_equals_open_clip_cliploss():
    img, txt = unit(8, 16, seed=1), unit(8, 16, seed=2)
    for scale in (2.0, torch.tensor(14.3)):
        ours = contrastive_loss(img, txt, scale)
        ref = ClipLoss()(img, txt, scale)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)  # float32, same formula


@pytest.mark.slow
def test_gather_with_grad_matches_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    # spawn, not fork: a fork after torch has started its thread pools can deadlock
    mp.spawn(rank_worker, args=(2, port, out), nprocs=2, join=True)
    img = unit(8, 6, dtype=torch.float64, seed=3).requires_grad_()
    txt = unit(8, 6, dtype=torch.float64, seed=4).requires_grad_()
    ref = contrastive_loss(img, txt, 3.0)
    ref.backward()
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    # mean over ranks = global loss; DDP/DeepSpeed average gradients over ranks -> grad / world
    torch.testing.assert_close(
        (parts[0]["loss"] + parts[1]["loss"]) / 2, ref.detach(), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        torch.cat([p["gi"] for p in parts]) / 2, img.grad, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        torch.cat([p["gt"] for p in parts]) / 2, txt.grad, rtol=1e-10, atol=1e-12
    )


# -- CG / RF / SCST --------------------------------------------------------------------------


def test_caption_loss_equals_open_clip_coca_caption_term():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(1, 11, (3, 7), generator=g)
    labels[0, 4:] = 0
    labels[2, 2:] = 0
    _, ref = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, pad_id=0)(
        unit(3, 4), unit(3, 4), logits, labels, 1.0
    )
    torch.testing.assert_close(caption_loss(logits, labels, pad_id=0), ref, rtol=1e-6, atol=1e-6)
    # unit weights change nothing; a weight scales exactly its own caption's tokens
    torch.testing.assert_close(caption_loss(logits, labels, 0, torch.ones(3)), ref)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none") * (labels != 0)
    w = torch.tensor([2.0, 0.5, 0.0])
    hand = (nll.sum(1) * w).sum() / (labels != 0).sum()
    torch.testing.assert_close(caption_loss(logits, labels, 0, w), hand)


def test_reward_weights_mean_one_and_zero_rewards():
    w = reward_weights(torch.tensor([0.0, 1.0, 3.0]))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.75, 2.25]))
    torch.testing.assert_close(reward_weights(torch.zeros(4)), torch.ones(4))


def test_scst_baselines_by_hand():
    logp = torch.tensor(
        [[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5], [-3.0, 0.0, 0.0], [-1.0, -1.0, 0.0]]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    r = torch.tensor([1.0, 2.0, 0.5, 1.5])
    seq = torch.tensor([-3.0, -1.5, -3.0, -2.0])
    loo_base = torch.tensor([2.0, 1.0, 1.5, 0.5])  # K = 2: the other sample of the same image
    torch.testing.assert_close(
        scst_loss(logp, mask, r, "leave_one_out", samples_per_image=2),
        -((r - loo_base) * seq).mean(),
    )
    g = torch.tensor([0.2, 0.2, 0.7, 0.7])
    torch.testing.assert_close(
        scst_loss(logp, mask, r, "greedy", greedy_rewards=g), -((r - g) * seq).mean()
    )
    with pytest.raises(ValueError):
        scst_loss(logp, mask, r, "leave_one_out", samples_per_image=3)


# -- grounding -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,p", [(3, 5), (4, 4), (5, 3), (2, 7)])
def test_hungarian_equals_brute_force(n, p):
    g = torch.Generator().manual_seed(n * 10 + p)
    for _ in range(5):
        scores = torch.randn(2, n, p, generator=g)
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, 0] = False
        got = hungarian_match(scores, mask)
        for b in range(2):
            rows = torch.nonzero(mask[b]).flatten().tolist()
            k = min(len(rows), p)
            best = max(
                (sum(float(scores[b, r, c]) for r, c in zip(rs, cs)), rs, cs)
                for rs in itertools.combinations(rows, k)
                for cs in itertools.permutations(range(p), k)
            )
            got_total = sum(float(scores[b, r, int(got[b, r])]) for r in rows if got[b, r] >= 0)
            assert math.isclose(got_total, best[0], rel_tol=1e-6)
            assert (got[b, ~mask[b]] == -1).all()
            matched = got[b][got[b] >= 0]
            assert len(set(matched.tolist())) == len(matched) == k  # one patch per noun


def _two_caption_example(dtype=torch.float64):
    noun = unit(2, 2, 3, dtype=dtype, seed=5)  # caption 0: 2 nouns, caption 1: 1 noun + 1 pad
    patch = unit(2, 4, 3, dtype=dtype, seed=6)
    mask = torch.tensor([[True, True], [True, False]])
    return noun, patch, mask


def test_grounding_loss_hand_computation():
    noun, patch, mask = _two_caption_example()
    scale, bias = 4.0, -1.0
    loss, stats = grounding_loss(noun, mask, patch, scale, bias)
    matches = hungarian_match(torch.einsum("bnd,bpd->bnp", noun, patch), mask)

    def s(w, r):
        return scale * float(w @ r) + bias

    def logsig(x):
        return -math.log1p(math.exp(-x))

    terms = []
    for i, n in [(0, 0), (0, 1), (1, 0)]:
        r = patch[i, int(matches[i, n])]
        t = logsig(s(noun[i, n], r))
        for j, m in [(0, 0), (0, 1), (1, 0)]:  # valid nouns of the other caption
            if j != i:
                t += logsig(-s(noun[j, m], r))
        terms.append(-t)
    assert math.isclose(float(loss), sum(terms) / 3, rel_tol=1e-12)
    assert stats["grounding_nouns"] == 3


def test_grounding_padding_and_empty_captions_change_nothing():
    noun, patch, mask = _two_caption_example()
    ref, _ = grounding_loss(noun, mask, patch, 4.0, -1.0)
    # more padding slots with garbage embeddings
    noun_p = torch.cat([noun, unit(2, 3, 3, dtype=noun.dtype, seed=9)], dim=1)
    mask_p = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    padded, _ = grounding_loss(noun_p, mask_p, patch, 4.0, -1.0)
    # plus a third caption with no nouns at all
    noun_e = torch.cat([noun_p, unit(1, 5, 3, dtype=noun.dtype, seed=10)])
    patch_e = torch.cat([patch, unit(1, 4, 3, dtype=noun.dtype, seed=11)])
    mask_e = torch.cat([mask_p, torch.zeros(1, 5, dtype=torch.bool)])
    empty, _ = grounding_loss(noun_e, mask_e, patch_e, 4.0, -1.0)
    torch.testing.assert_close(padded, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empty, ref, rtol=1e-12, atol=1e-12)
    # no nouns anywhere: exactly zero, finite gradients
    w = noun.clone().requires_grad_()
    none, stats = grounding_loss(w, torch.zeros_like(mask), patch, 4.0, -1.0)
    none.backward()
    assert float(none.detach()) == 0.0 and stats["grounding_nouns"] == 0
    assert torch.isfinite(w.grad).all() and (w.grad == 0).all()


def test_pointing_game_by_hand():
    # 2x2 grid; patch centres (0.25,0.25) (0.75,0.25) (0.25,0.75) (0.75,0.75)
    patch = torch.eye(4).unsqueeze(0)
    noun = torch.eye(4)[[1, 2, 3]].unsqueeze(0)  # best patches 1, 2, 3
    boxes = torch.tensor([[[0.5, 0.0, 1.0, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.1, 0.1]]])
    has_box = torch.tensor([[True, True, True]])
    score, count = pointing_game(
        noun, patch, boxes, has_box, torch.ones(1, 3, dtype=torch.bool), grid=2
    )
    assert count == 3 and math.isclose(score, 1 / 3)  # only noun 0 points inside its box
    score, count = pointing_game(
        noun,
        patch,
        boxes,
        torch.zeros(1, 3, dtype=torch.bool),
        torch.ones(1, 3, dtype=torch.bool),
        grid=2,
    )
    assert count == 0 and math.isnan(score)


# -- reconstruction --------------------------------------------------------------------------


def test_reconstruction_loss_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    target = torch.tensor([[[0.0, 4.0], [1.0, 3.0]]])
    assert math.isclose(float(reconstruction_loss(pred, target)), (1 + 2 + 1 + 3) / 4)
    # per-patch normalised targets: [0,4] -> [-1, 1]; [1,3] -> [-1, 1]
    hand = (abs(1 + 1) + abs(2 - 1) + abs(0 + 1) + abs(0 - 1)) / 4
    assert math.isclose(
        float(reconstruction_loss(pred, target, norm_pix=True, eps=0.0)), hand, rel_tol=1e-6
    )
    with pytest.raises(ValueError):
        reconstruction_loss(pred, target[:, :1])


# -- gradcheck (float64) ---------------------------------------------------------------------


def test_gradcheck_hand_written_losses():
    noun, patch, mask = _two_caption_example()
    matches = hungarian_match(torch.einsum("bnd,bpd->bnp", noun, patch), mask)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    w, r = noun.clone().requires_grad_(), patch.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, r, s, b: grounding_loss(w, mask, r, s, b, matches)[0], (w, r, scale, bias)
    )
    img = unit(4, 3, dtype=torch.float64, seed=7).requires_grad_()
    txt = unit(4, 3, dtype=torch.float64, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: contrastive_loss(a, b, 2.0), (img, txt))
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 2, 0], [3, 4, 4]])
    assert torch.autograd.gradcheck(
        lambda x: caption_loss(x, labels, 0, torch.tensor([0.5, 1.5], dtype=torch.float64)),
        (logits,),
    )
    pred = (torch.rand(2, 3, 4, dtype=torch.float64) + 2).requires_grad_()  # away from L1's kink
    target = torch.rand(2, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: reconstruction_loss(x, target, norm_pix=True), (pred,)
    )
    logp = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: scst_loss(
            x, torch.ones(4, 3, dtype=torch.bool), torch.tensor([1.0, 2, 3, 4]), samples_per_image=2
        ),
        (logp,),
    )


def test_hungarian_brings_scores_to_cpu_once(monkeypatch):
    calls = []
    original = torch.Tensor.cpu

    def counting(self, *a, **k):
        calls.append(tuple(self.shape))
        return original(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting)
    hungarian_match(torch.randn(16, 4, 9), torch.ones(16, 4, dtype=torch.bool))
    assert calls.count((16, 4, 9)) == 1  # the scores cross once for the batch, not per sample
