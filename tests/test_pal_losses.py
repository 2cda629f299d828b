"""PAL losses: Sinkhorn against POT, PAL weights, InfoNCE against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from bimac.losses import cosine_cost, info_nce, pal_loss, pal_pool, pal_weights, sinkhorn_ot

EPS, ITERS = 0.05, 30


def _problem(b=4, s=7, t=5, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, d, generator=g, dtype=dtype)
    y = torch.randn(b, t, d, generator=g, dtype=dtype)
    a = torch.rand(b, s, generator=g, dtype=dtype) + 0.1
    bb = torch.rand(b, t, generator=g, dtype=dtype) + 0.1
    return cosine_cost(x, y), a / a.sum(1, keepdim=True), bb / bb.sum(1, keepdim=True)


def _pot(cost, a, b):
    # Reference: POT's log-domain Sinkhorn, same eps and a fixed iteration count (stopThr=0).
    return np.array(
        [
            ot.sinkhorn2(
                a[i].double().numpy(),
                b[i].double().numpy(),
                cost[i].double().numpy(),
                EPS,
                method="sinkhorn_log",
                numItermax=ITERS,
                stopThr=0.0,
                warn=False,
            )
            for i in range(cost.shape[0])
        ]
    )


def test_cosine_cost_matches_definition():
    x, y = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    c = cosine_cost(x, y)
    ref = 1 - torch.nn.functional.cosine_similarity(x[:, :, None], y[:, None], dim=-1)
    torch.testing.assert_close(c, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("grad_mode", ["unrolled", "envelope"])
def test_sinkhorn_equals_pot_float64(grad_mode):
    cost, a, b = _problem()
    ours = sinkhorn_ot(cost, a, b, EPS, ITERS, grad_mode=grad_mode)
    np.testing.assert_allclose(ours.numpy(), _pot(cost, a, b), rtol=0, atol=1e-6)


def test_sinkhorn_equals_pot_float32_and_under_autocast():
    cost, a, b = _problem(dtype=torch.float32, seed=1)
    ref = _pot(cost, a, b)
    np.testing.assert_allclose(sinkhorn_ot(cost, a, b, EPS, ITERS).numpy(), ref, atol=1e-4, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_ot(cost.bfloat16(), a, b, EPS, ITERS)
    assert out.dtype == torch.float32  # solver runs in float32 even under bf16 autocast
    # bf16 inputs only lose precision in the cost itself: compare to POT on the rounded cost.
    np.testing.assert_allclose(out.numpy(), _pot(cost.bfloat16().float(), a, b), atol=1e-4, rtol=0)


def test_sinkhorn_masked_patches_receive_no_mass_and_match_pot_on_support():
    cost, a, b = _problem(seed=2)
    a[:, -2:] = 0  # dropped source patches
    b[:, :1] = 0  # dropped target patch
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    cost.requires_grad_(True)
    ours = sinkhorn_ot(cost, a, b, EPS, ITERS, grad_mode="unrolled")
    # POT on the support only (it cannot take zero masses in the log domain).
    ref = _pot(cost[:, :-2, 1:].detach(), a[:, :-2], b[:, 1:])
    np.testing.assert_allclose(ours.detach().numpy(), ref, atol=1e-6, rtol=0)
    ours.sum().backward()
    grad = cost.grad
    assert torch.isfinite(grad).all()
    # The gradient w.r.t. the cost of an unrolled solver is the plan plus the implicit part;
    # rows/columns without mass carry no plan, so their cost entries get exactly zero gradient.
    assert (grad[:, -2:, :] == 0).all() and (grad[:, :, :1] == 0).all()
    # The envelope gradient is the plan itself: dropped patches send and receive exactly zero.
    cost.grad = None
    sinkhorn_ot(cost, a, b, EPS, ITERS, grad_mode="envelope").sum().backward()
    plan = cost.grad
    assert (plan[:, -2:, :] == 0).all() and (plan[:, :, :1] == 0).all()
    torch.testing.assert_close(plan.sum(2), a)  # row marginals: the masses, zeros included


def test_sinkhorn_all_masked_sample_gives_zero_not_nan():
    cost, a, b = _problem(seed=3)
    a[1] = 0
    b[2] = 0
    cost.requires_grad_(True)
    a.requires_grad_(True)
    for mode in ("unrolled", "envelope"):
        out = sinkhorn_ot(cost, a, b, EPS, ITERS, grad_mode=mode)
        assert out[1] == 0 and out[2] == 0 and (out[[0, 3]] > 0).all()
        (g_cost, g_a) = torch.autograd.grad(out.sum(), (cost, a), allow_unused=True)
        assert torch.isfinite(g_cost).all() and (g_cost[1:3] == 0).all()
        if g_a is not None:
            assert torch.isfinite(g_a).all()


def test_sinkhorn_gradcheck_float64_unrolled():
    cost, a, b = _problem(b=2, s=4, t=3, d=5, seed=4)
    cost.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda c, aa, bb: sinkhorn_ot(c, aa, bb, 0.5, 10, grad_mode="unrolled"), (cost, a, b)
    )
    # With dropped patches (mass fixed at zero), the gradient w.r.t. the cost is still exact.
    a2 = a.detach().clone()
    a2[:, 0] = 0
    assert torch.autograd.gradcheck(
        lambda c: sinkhorn_ot(c, a2, b.detach(), 0.5, 10, grad_mode="unrolled"), (cost,)
    )


def test_sinkhorn_envelope_gradient_is_the_plan():
    cost, a, b = _problem(b=2, s=4, t=3, seed=5)
    cost.requires_grad_(True)
    sinkhorn_ot(cost, a, b, EPS, ITERS, grad_mode="envelope").sum().backward()
    plan = ot.sinkhorn(
        a[0].numpy(), b[0].numpy(), cost[0].detach().numpy(), EPS,
        method="sinkhorn_log", numItermax=ITERS, stopThr=0.0, warn=False,
    )  # fmt: skip
    np.testing.assert_allclose(cost.grad[0].numpy(), plan, atol=1e-9)


def test_sinkhorn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected cost"):
        sinkhorn_ot(torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 4))


def _attn(b=2, heads=3, t=4, s=6, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(b, heads, t, s, generator=g), -1) for _ in range(layers)]


def test_pal_weights_distribution_pad_and_top_rho():
    att = _attn()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    w = pal_weights(att, mask, k=2, tau=1.0, rho=1.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    # Hand computation: mean of the last 2 layers and heads, mean over real steps.
    ref = torch.stack(att[-2:]).mean(dim=(0, 2))
    ref = torch.stack([ref[0, :3].mean(0), ref[1, :2].mean(0)])
    torch.testing.assert_close(w, ref / ref.sum(-1, keepdim=True))
    # PAD steps do not matter: changing their attention leaves w unchanged.
    att2 = [a.clone() for a in att]
    for a in att2:
        a[0, :, 3] = torch.softmax(torch.randn(3, 6) * 10, -1)
    torch.testing.assert_close(pal_weights(att2, mask, k=2, rho=1.0), w)
    # Top-rho: keep the smallest high-weight set reaching rho of the mass, renormalised.
    wr = pal_weights(att, mask, k=2, tau=1.0, rho=0.5)
    for i in range(2):
        sw, order = w[i].sort(descending=True)
        n_keep = int((sw.cumsum(0) - sw < 0.5).sum())
        expected = torch.zeros(6)
        expected[order[:n_keep]] = sw[:n_keep] / sw[:n_keep].sum()
        torch.testing.assert_close(wr[i], expected)
        assert 0 < n_keep < 6
    # Temperature: tau < 1 sharpens (w ** (1 / tau), renormalised).
    ws = pal_weights(att, mask, k=2, tau=0.5, rho=1.0)
    torch.testing.assert_close(ws, w**2 / (w**2).sum(-1, keepdim=True))
    # A caption with no real step gets no mass.
    assert pal_weights(att, torch.zeros_like(mask), rho=0.5).abs().sum() == 0


def test_pal_pool_and_loss():
    e_real, e_syn = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    w = torch.softmax(torch.randn(2, 6), -1)
    r, rs = pal_pool(e_real, w), pal_pool(e_syn, w)
    torch.testing.assert_close(r[0], (w[0, :, None] * e_real[0]).sum(0))
    loss, stats = pal_loss(r, rs)
    cos = torch.nn.functional.cosine_similarity(r, rs)
    torch.testing.assert_close(loss, (1 - cos).mean())
    loss_v, _ = pal_loss(r, rs, valid=torch.tensor([True, False]))
    torch.testing.assert_close(loss_v, 1 - cos[0])
    assert pal_loss(r, r)[0].abs() < 1e-6


def test_info_nce_hand_computation_b2():
    real = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    syn = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    t = 0.5
    z = [v / v.norm() for v in (real[0], real[1], syn[0], syn[1])]
    positive = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i in range(4):
        sims = {j: float(z[i] @ z[j]) / t for j in range(4) if j != i}
        total -= sims[positive[i]] - math.log(sum(math.exp(s) for s in sims.values()))
    loss, stats = info_nce(real, syn, temperature=t)
    assert abs(loss.item() - total / 4) < 1e-6
    assert 0 <= stats["info_nce_acc"] <= 1
