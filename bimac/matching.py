"""Noun-to-patch assignment for grounding (BiMAC Eq. 7): which patch each noun is matched to.
Used by the model (grounded noun embeddings for the patch decoder) and by the grounding loss."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def hungarian_match(scores: torch.Tensor, noun_mask: torch.Tensor) -> torch.Tensor:
    """Noun-to-patch bipartite matching maximising the alignment score S = W Rᵀ (Eq. 7).

    ``scores [B, N, P]`` (detached here), ``noun_mask [B, N]`` -> ``LongTensor [B, N]`` holding each
    noun's patch index, -1 for padded nouns (and for nouns left over when N > P). Rectangular
    problems are solved by SciPy per sample; the scores cross to the CPU once for the whole batch
    (one device sync per step, not one per sample).
    """
    if scores.dim() != 3 or noun_mask.shape != scores.shape[:2]:
        raise ValueError(
            f"scores [B, N, P] and noun_mask [B, N] expected, got "
            f"{tuple(scores.shape)} and {tuple(noun_mask.shape)}"
        )
    host = scores.detach().float().cpu().numpy()
    valid = noun_mask.detach().cpu().numpy().astype(bool)
    matches = np.full(valid.shape, -1, dtype=np.int64)
    for b in range(host.shape[0]):
        rows = np.flatnonzero(valid[b])
        if rows.size == 0:
            continue
        r, c = linear_sum_assignment(host[b, rows], maximize=True)
        matches[b, rows[r]] = c
    return torch.from_numpy(matches).to(scores.device)
