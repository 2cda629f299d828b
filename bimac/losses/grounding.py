"""Text-region grounding (BiMAC Eq. 7): the sigmoid loss over the nouns matched to patches
(:func:`bimac.matching.hungarian_match`), and the pointing-game score used as a training-time
grounding metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bimac.matching import hungarian_match


def matched_patches(patch_emb: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """The patch embedding matched to each noun: ``patch_emb [B, P, D]``, ``matches [B, N]``
    (-1: none, which takes patch 0; mask it out) -> ``[B, N, D]``."""
    index = matches.clamp(min=0).unsqueeze(-1).expand(-1, -1, patch_emb.shape[-1])
    return torch.gather(patch_emb, 1, index)


def grounding_terms(
    noun_emb: torch.Tensor,
    noun_mask: torch.Tensor,
    matched: torch.Tensor,
    positive: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7's term of every matched noun: ``-(log σ(s(w_n, r_k)) + Σ_{w' ∈ W'} log(1 − σ(s(w', r_k))))``
    with ``W'`` the valid nouns (``noun_mask [B, N]``) of every *other* caption of the batch.

    ``matched [B, N, D]``: the patch embedding matched to each noun (:func:`matched_patches`);
    ``positive [B, N]``: the nouns that have one. Returns ``(per_noun [B, N], s_pos [B, N])``: the
    terms (zero where not positive) and the positive scores. Each caption's nouns are scored
    against the whole batch given, so the engine's feature cache passes the global batch here.
    """
    b = noun_emb.shape[0]
    s_pos = logit_scale * (noun_emb * matched).sum(-1) + logit_bias  # [B, N]
    # negatives: nouns m of captions j != i, scored against the patch matched to (i, n)
    s_neg = logit_scale * torch.einsum("ind,jmd->injm", matched, noun_emb) + logit_bias
    other = ~torch.eye(b, dtype=torch.bool, device=noun_emb.device)
    neg_mask = other[:, None, :, None] & noun_mask[None, None, :, :]  # [B, 1, B, N]
    neg_term = (F.logsigmoid(-s_neg) * neg_mask).sum(dim=(2, 3))  # [B, N]
    per_noun = -(F.logsigmoid(s_pos) + neg_term) * positive
    return per_noun, s_pos


def grounding_loss(
    noun_emb: torch.Tensor,
    noun_mask: torch.Tensor,
    patch_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    matches: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_GIT grounding term, Eq. 7.

    ``s = logit_scale * <w, r> + logit_bias`` for noun embeddings ``noun_emb [B, N, D]`` and patch
    embeddings ``patch_emb [B, P, D]``. Each valid noun ``w_n`` of caption ``i`` is matched to
    one patch ``k`` of image ``i`` (Hungarian on detached scores, or the given ``matches``);
    its term is :func:`grounding_terms`' with ``W'`` = the valid nouns of every *other* caption in
    the batch. The loss is minus the mean of these terms
    over all matched nouns of the batch, so padding changes nothing and a caption without nouns
    adds nothing (a batch without any nouns gives an exact zero that still backpropagates).
    As in Eq. 7 the negatives are summed, not averaged, so the term grows with the batch (the
    global batch in pretraining); the learnable bias (initialised at -5 in BiMAC) keeps it small
    at the start.
    Returns ``(loss, {"grounding_pos": mean σ(s⁺), "grounding_nouns": count})``.
    """
    if matches is None:
        matches = hungarian_match(torch.einsum("bnd,bpd->bnp", noun_emb, patch_emb), noun_mask)
    positive = noun_mask & (matches >= 0)  # [B, N]
    matched = matched_patches(patch_emb, matches)
    per_noun, s_pos = grounding_terms(
        noun_emb, noun_mask, matched, positive, logit_scale, logit_bias
    )
    count = positive.sum()
    loss = per_noun.sum() / count.clamp(min=1)
    with torch.no_grad():
        pos = (torch.sigmoid(s_pos) * positive).sum() / count.clamp(min=1)
    return loss, {"grounding_pos": float(pos), "grounding_nouns": float(count)}


def pointing_game(
    noun_emb: torch.Tensor,
    patch_emb: torch.Tensor,
    noun_boxes: torch.Tensor,
    noun_has_box: torch.Tensor,
    noun_mask: torch.Tensor,
    grid: int,
) -> tuple[float, int]:
    """Share of nouns whose best-scoring patch centre lies inside that noun's object box.

    ``noun_boxes [B, N, 4]`` are ``[x0, y0, x1, y1]`` in [0, 1]; patches are in row-major order on a
    ``grid x grid`` lattice. Only valid nouns with a box count. Returns ``(score, count)``;
    ``score`` is NaN when no noun has a box.
    """
    with torch.no_grad():
        best = torch.einsum("bnd,bpd->bnp", noun_emb, patch_emb).argmax(-1)  # [B, N]
        cx = ((best % grid).float() + 0.5) / grid
        cy = ((best // grid).float() + 0.5) / grid
        boxes = noun_boxes.to(best.device).float()
        inside = (
            (cx >= boxes[..., 0])
            & (cx <= boxes[..., 2])
            & (cy >= boxes[..., 1])
            & (cy <= boxes[..., 3])
        )
        counted = noun_mask.to(best.device) & noun_has_box.to(best.device)
        total = int(counted.sum())
        hits = int((inside & counted).sum())
    return (hits / total if total else float("nan")), total
