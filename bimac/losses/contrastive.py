"""Multi-pair contrastive learning (BiMAC Eqs. 3-5)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; gradients flow back to their owners."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    across_ranks: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_MCL, Eq. 5: ``(1/2B) Σ_i (L_IT + L_TI)`` with the InfoNCE terms of Eqs. 3 and 4.

    ``image_features``/``text_features``: L2-normalised ``[B, D]`` (this rank's rows);
    ``logit_scale`` = 1/τ (the paper fixes τ = 0.5, i.e. 2.0; or pass a learnable ``exp(s)``).
    When ``torch.distributed`` is initialised with more than one rank, every rank scores its own
    rows against all ranks' features gathered *with* gradient (open_clip's ``local_loss=True,
    gather_with_grad=True``): the mean of the ranks' losses equals the loss over the global batch,
    and after the usual gradient averaging across ranks so do the gradients.
    ``across_ranks=False``: the features already hold the whole batch (e.g. gathered without
    gradient by the engine's feature cache); no gather. ``reduction="none"``: the ``[B]`` per-row
    losses ``(L_IT,i + L_TI,i) / 2``, whose mean is the loss.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"paired [B, D] features expected, got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    b = image_features.shape[0]
    offset = 0
    all_image, all_text = image_features, text_features
    gather = across_ranks and dist.is_available() and dist.is_initialized()
    if gather and dist.get_world_size() > 1:
        all_image = _gather_with_grad(image_features)
        all_text = _gather_with_grad(text_features)
        offset = b * dist.get_rank()
    labels = torch.arange(offset, offset + b, device=image_features.device)
    logits_per_image = logit_scale * image_features @ all_text.T  # s_ij / τ, Eq. 3
    logits_per_text = logit_scale * text_features @ all_image.T  # Eq. 4
    per_row = (
        F.cross_entropy(logits_per_image, labels, reduction="none")
        + F.cross_entropy(logits_per_text, labels, reduction="none")
    ) / 2
    return per_row if reduction == "none" else per_row.mean()
