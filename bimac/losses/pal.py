"""Patch-Alignment Loss of the PAL captioner (PAL paper §4.6, Eqs. 8-10)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pal_weights(
    cross_attentions: Sequence[torch.Tensor],
    token_mask: torch.Tensor,
    k: int = 2,
    tau: float = 1.0,
    rho: float = 0.5,
) -> torch.Tensor:
    """Eq. 8: text-conditioned patch weights ``w [B, S]``, each row a distribution over patches.

    ``cross_attentions``: one ``[B, heads, T, S]`` tensor per decoder layer (the model's
    ``cross_attentions`` output, eager attention); the last ``k`` layers are averaged over layers
    and heads. ``token_mask [B, T]`` is True at real caption steps; PAD steps are left out of the
    mean over steps. The temperature acts on the attention distribution as
    ``softmax(log(a) / tau)`` (``tau = 1`` keeps it, ``tau < 1`` sharpens). Top-rho keeps the
    smallest set of highest-weight patches whose mass reaches ``rho`` (at least one patch; ``rho
    >= 1`` keeps all) and renormalises. A caption with no real step gets all-zero weights.
    Differentiable in the attention values (the patch selection itself is piecewise constant).
    """
    if not 1 <= k <= len(cross_attentions):
        raise ValueError(
            f"pal_weights: k={k} but the decoder returned {len(cross_attentions)} layers"
        )
    if tau <= 0 or rho <= 0:
        raise ValueError(f"pal_weights: need tau > 0 and rho > 0, got tau={tau}, rho={rho}")
    att = torch.stack([a.float() for a in cross_attentions[-k:]]).mean(dim=(0, 2))  # [B, T, S]
    if token_mask.shape != att.shape[:2]:
        raise ValueError(
            f"pal_weights: token_mask {tuple(token_mask.shape)} does not match attention steps "
            f"{tuple(att.shape[:2])}"
        )
    mask = token_mask.to(att.dtype)
    n_steps = mask.sum(1, keepdim=True)
    saliency = (att * mask[:, :, None]).sum(1) / n_steps.clamp_min(1.0)  # [B, S]
    has_steps = n_steps > 0
    tiny = torch.finfo(saliency.dtype).tiny
    w = torch.softmax(saliency.clamp_min(tiny).log() / tau, dim=-1)
    if rho < 1.0:
        sorted_w, order = w.sort(dim=-1, descending=True)
        mass_before = sorted_w.cumsum(-1) - sorted_w
        keep_sorted = mass_before < rho
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        w = w * keep
        w = w / w.sum(-1, keepdim=True)
    return torch.where(has_steps, w, torch.zeros_like(w))


def pal_pool(patches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 9: ``r = sum_s w_s E_s(x)`` for ``patches [B, S, D]`` and ``weights [B, S]`` -> ``[B, D]``."""
    return torch.einsum("bs,bsd->bd", weights.to(patches.dtype), patches)


def pal_loss(
    pooled_real: torch.Tensor, pooled_syn: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 10: mean over the batch of ``1 - cos(r, r~)``.

    ``valid [B]`` (optional, bool) leaves out captions without weights; the mean is over valid
    samples (0 if none). Stats (detached): ``pal_cos``, the mean cosine.
    """
    cos = F.cosine_similarity(pooled_real.float(), pooled_syn.float(), dim=-1)
    if valid is None:
        valid = torch.ones_like(cos, dtype=torch.bool)
    n = valid.sum().clamp_min(1)
    cos = torch.where(valid, cos, torch.ones_like(cos))
    loss = (1.0 - cos).sum() / n
    return loss, {"pal_cos": (cos.sum() - (~valid).sum()).detach() / n}
