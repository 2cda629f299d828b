"""Patch reconstruction from grounded text (BiMAC L_rec, "Generating Image Patches from Textual Cues")."""

from __future__ import annotations

import torch


def reconstruction_loss(
    predicted: torch.Tensor,
    target: torch.Tensor,
    norm_pix: bool = False,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_rec = (1/m) Σ_j ||r_j − r̂_j||₁ over the m patches of each image, averaged over the batch.

    ``predicted``/``target``: ``[B, m, p*p*C]`` patch pixels. The L1 norm of a patch is divided by
    its pixel count as well, so the loss reads as a mean absolute pixel error independent of the
    patch size. ``norm_pix``: compare against each target patch standardised by its own mean and
    standard deviation (MAE's per-patch normalised pixels). ``reduction="sum"``: the sum of the
    absolute errors (divide by the element count of a larger batch for its mean).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if predicted.shape != target.shape:
        raise ValueError(
            f"shape mismatch: predicted {tuple(predicted.shape)} vs target {tuple(target.shape)}"
        )
    target = target.detach()
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + eps).sqrt()
    error = (predicted - target).abs()
    return error.sum() if reduction == "sum" else error.mean()
