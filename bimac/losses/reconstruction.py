"""Patch reconstruction from grounded text (BiMAC L_rec, "Generating Image Patches from Textual Cues")."""

from __future__ import annotations

import torch


def reconstruction_loss(
    predicted: torch.Tensor, target: torch.Tensor, norm_pix: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """L_rec = (1/m) Σ_j ||r_j − r̂_j||₁ over the m patches of each image, averaged over the batch.

    ``predicted``/``target``: ``[B, m, p*p*C]`` patch pixels. The L1 norm of a patch is divided by
    its pixel count as well, so the loss reads as a mean absolute pixel error independent of the
    patch size. ``norm_pix``: compare against each target patch standardised by its own mean and
    standard deviation (MAE's per-patch normalised pixels).
    """
    if predicted.shape != target.shape:
        raise ValueError(
            f"shape mismatch: predicted {tuple(predicted.shape)} vs target {tuple(target.shape)}"
        )
    target = target.detach()
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + eps).sqrt()
    return (predicted - target).abs().mean()
