"""Batched entropic optimal transport (PAL paper Eqs. 12-13), log-domain Sinkhorn in torch.

POT solves one problem per call (``ot.sinkhorn2``) or checks convergence on the host every ten
iterations (``ot.batch``); the PAL objective needs one small problem per caption on every step, so
this solver runs a fixed number of iterations over the whole minibatch at once, with no Python
loop over samples and no host synchronisation. The iteration is exactly POT's
``ot.bregman.sinkhorn_log`` (``v`` update, then ``u`` update, starting from zero potentials), so
``sinkhorn_ot`` equals ``ot.sinkhorn2(a, b, C, eps, method="sinkhorn_log", numItermax=n_iters,
stopThr=0)`` per sample (tested to 1e-6 in float64, 1e-4 in float32).

Gradient modes
--------------
``"unrolled"``
    Autograd through every iteration: the exact gradient of the computed value
    ``<P_n, C>`` (``P_n`` the plan after ``n_iters`` iterations) with respect to the cost and the
    masses. Memory grows with ``n_iters * B * S * T``.
``"envelope"`` (default)
    The plan is computed without a graph and treated as a constant: ``d/dC = P*``. By the
    envelope (Danskin) theorem this is the exact gradient of the *regularised* optimum
    ``<P*, C> - eps H(P*)`` at convergence, not of the reported ``<P*, C>``: it drops the term
    ``<dP*/dC, C>`` = ``eps * dH(P*)/dC``, which is O(eps) and vanishes as ``eps -> 0``; it also
    gives no gradient to the masses ``a``, ``b``. We default to it because it needs one plan of
    memory instead of ``n_iters`` and, for a regulariser whose role is to pull matched patch
    tokens together, the direction ``P*`` (move each pair of tokens along its transported mass)
    is the intended one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

GradMode = Literal["unrolled", "envelope"]


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 12: ``C[b, s, t] = 1 - cos(x[b, s], y[b, t])`` for ``x [B, S, D]``, ``y [B, T, D]``.

    Computed in float32 (or float64 if given) even under autocast.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xn = F.normalize(x.to(dtype), dim=-1)
        yn = F.normalize(y.to(dtype), dim=-1)
        return 1.0 - xn @ yn.transpose(1, 2)


def _safe_log(mass: torch.Tensor) -> torch.Tensor:
    """log(mass) with -inf where the mass is zero and a finite gradient everywhere."""
    tiny = torch.finfo(mass.dtype).tiny
    return torch.where(mass > 0, mass.clamp_min(tiny).log(), float("-inf"))


# exp(-80) ~ 1.8e-35 is far below float32/float64 rounding relative to the largest term (1 after
# the max shift), so clamping the shifted exponents there changes no sum; it keeps exp() away from
# denormal results (measured ~17x slower here) and -inf inputs (~2x).
_EXP_FLOOR = -80.0


def _logsumexp_(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.logsumexp`` over ``dim`` computed in place in ``x`` (a scratch buffer, no autograd).

    ~2x faster than ``torch.logsumexp`` here (no temporaries, no slow exp path). With autograd we
    keep ``torch.logsumexp``: it saves one ``[B, S, T]`` tensor per call where this would save two.
    """
    shift = x.amax(dim, keepdim=True)
    terms = x.sub_(shift).clamp_min_(_EXP_FLOOR).exp_()
    return terms.sum(dim).log_() + shift.squeeze(dim)


def _sinkhorn_log_plan(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, n_iters: int
) -> torch.Tensor:
    log_kernel = -cost / eps
    log_a, log_b = _safe_log(a), _safe_log(b)
    # Without autograd, every half-iteration reuses one buffer (allocating a fresh [B, S, T]
    # tensor each time costs more than the arithmetic).
    scratch = None if torch.is_grad_enabled() else torch.empty_like(log_kernel)
    # POT starts from zero potentials; dropped patches start (and stay) at -inf: log 0 minus a
    # finite logsumexp (every sample has some mass, see ``sinkhorn_ot``).
    u = torch.where(a > 0, 0.0, -torch.inf).to(a.dtype)
    lse = torch.logsumexp if scratch is None else _logsumexp_
    for _ in range(n_iters):
        v = log_b - lse(torch.add(log_kernel, u[:, :, None], out=scratch), 1)
        u = log_a - lse(torch.add(log_kernel, v[:, None, :], out=scratch), 2)
    return torch.exp(log_kernel + u[:, :, None] + v[:, None, :])


def sinkhorn_ot(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float = 0.05,
    n_iters: int = 30,
    grad_mode: GradMode = "envelope",
) -> torch.Tensor:
    """Eq. 13: per-sample transport cost ``<P*, C>`` of the entropic OT plan, shape ``[B]``.

    ``cost [B, S, T]``, masses ``a [B, S]`` and ``b [B, T]`` (non-negative; zeros mark dropped or
    padded patches, which receive no mass). A sample whose ``a`` or ``b`` has no mass returns 0
    with zero (not NaN) gradients. Runs in float32 (float64 if given) even under autocast.
    See the module docstring for ``grad_mode``.
    """
    if cost.dim() != 3 or a.shape != cost.shape[:2] or b.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(
            f"sinkhorn_ot: expected cost [B, S, T], a [B, S], b [B, T]; got "
            f"{tuple(cost.shape)}, {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if grad_mode not in ("unrolled", "envelope"):
        raise ValueError(
            f"sinkhorn_ot: grad_mode must be 'unrolled' or 'envelope', got {grad_mode!r}"
        )
    if eps <= 0 or n_iters < 1:
        raise ValueError(f"sinkhorn_ot: need eps > 0 and n_iters >= 1, got {eps}, {n_iters}")
    dtype = torch.promote_types(cost.dtype, torch.float32)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost, a, b = cost.to(dtype), a.to(dtype), b.to(dtype)
        valid = (a.sum(1) > 0) & (b.sum(1) > 0)
        # Empty samples are solved on uniform dummy masses (finite everywhere) and zeroed below,
        # so neither their values nor their gradients can turn into NaN.
        a_safe = torch.where(valid[:, None], a, 1.0 / a.shape[1])
        b_safe = torch.where(valid[:, None], b, 1.0 / b.shape[1])
        if grad_mode == "envelope":
            with torch.no_grad():
                plan = _sinkhorn_log_plan(cost, a_safe, b_safe, eps, n_iters)
        else:
            plan = _sinkhorn_log_plan(cost, a_safe, b_safe, eps, n_iters)
        value = (plan * cost).sum(dim=(1, 2))
        return torch.where(valid, value, torch.zeros_like(value))
