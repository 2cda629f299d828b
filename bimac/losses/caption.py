"""Caption generation (BiMAC Eq. 6), its CIDEr-D reward weighting ("RF", Table 5), and SCST."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def caption_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pad_id: int,
    weights: torch.Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """L_CG, Eq. 6: teacher-forced token cross-entropy, optionally weighted by R(T_i, I_i).

    ``logits [B, T, V]`` predict ``labels [B, T]``; tokens equal to ``pad_id`` are masked out.
    ``weights [B]`` (detached): one factor per caption, e.g. from :func:`reward_weights`. The sum
    is divided by the number of non-pad tokens (not by the weights), so with unit weights this is
    the usual mean token cross-entropy of CoCa (open_clip's ``CoCaLoss`` caption term).
    ``reduction="sum"``: the weighted sum alone (divide by the non-pad tokens of a larger batch).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    token_nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [B, T]
    mask = (labels != pad_id).to(token_nll.dtype)
    if weights is not None:
        if weights.shape != labels.shape[:1]:
            raise ValueError(f"weights must be [B] = {labels.shape[0]}, got {tuple(weights.shape)}")
        mask = mask * weights.detach().to(mask.dtype).unsqueeze(1)
    total = (token_nll * mask).sum()
    return total if reduction == "sum" else total / (labels != pad_id).sum().clamp(min=1)


def reward_weights(
    rewards: torch.Tensor, eps: float = 1e-6, mean: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Per-caption weights R_i / mean(R) for Eq. 6, so the batch's mean weight is 1.

    Dividing by the batch mean keeps the CG loss on the same scale as unweighted CE whatever the
    absolute CIDEr-D level (which rises from ~0 to >1 during training); only the *relative*
    reward of each caption reweights it. A batch whose rewards are all ~0 gets unit weights.
    ``mean``: the mean clamped reward of the larger batch these rows belong to (the global batch
    under gradient accumulation); default: the mean of ``rewards``.
    """
    rewards = rewards.detach().float().clamp(min=0)
    mean = rewards.mean() if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    if mean <= eps:
        return torch.ones_like(rewards)
    return rewards / mean


def scst_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    baseline: Literal["greedy", "leave_one_out"] = "leave_one_out",
    greedy_rewards: torch.Tensor | None = None,
    samples_per_image: int = 1,
) -> torch.Tensor:
    """Self-critical sequence training: ``-(1/N) Σ_n (r_n − b_n) Σ_t log p(y_nt)``.

    ``logprobs [N, T]``: log-probabilities of the sampled tokens, ``mask [N, T]``: True for real
    tokens, ``rewards [N]`` (e.g. CIDEr-D). Baseline ``b_n``: the greedy caption's reward of the
    same image (``greedy_rewards [N]``, Rennie et al. 2017), or the mean reward of the other
    ``samples_per_image`` samples of the same image (rows grouped image by image, K >= 2).
    """
    rewards = rewards.detach().float()
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("baseline='greedy' needs greedy_rewards")
        base = greedy_rewards.detach().float()
    elif baseline == "leave_one_out":
        k = samples_per_image
        if k < 2 or rewards.numel() % k:
            raise ValueError(
                f"leave-one-out needs >= 2 samples per image dividing N={rewards.numel()}, got {k}"
            )
        grouped = rewards.view(-1, k)
        base = ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).reshape(-1)
    else:
        raise ValueError(f"unknown baseline {baseline!r}")
    seq_logprob = (logprobs * mask.to(logprobs.dtype)).sum(1)
    return -((rewards - base).to(seq_logprob.dtype) * seq_logprob).mean()
