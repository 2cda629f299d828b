"""InfoNCE between pooled real and synthetic descriptors (PAL paper Eq. 11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    real: torch.Tensor, syn: torch.Tensor, temperature: float = 0.07
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 11 over ``Z = {r_i, r~_i}`` (2B L2-normalised vectors from ``real``, ``syn`` ``[B, D]``).

    Each vector's positive is its real/synthetic counterpart; the other 2B - 2 are negatives
    (the vector itself is left out of the denominator). Computed in float32. Stats (detached):
    ``info_nce_acc``, the fraction of vectors whose nearest other vector is their positive.
    """
    if real.shape != syn.shape or real.dim() != 2:
        raise ValueError(f"info_nce: expected two [B, D] tensors, got {real.shape}, {syn.shape}")
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    n = real.shape[0]
    z = F.normalize(torch.cat([real, syn]).float(), dim=-1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = torch.arange(2 * n, device=z.device).roll(n)
    loss = F.cross_entropy(logits, positive)
    acc = (logits.argmax(-1) == positive).float().mean()
    return loss, {"info_nce_acc": acc.detach()}
