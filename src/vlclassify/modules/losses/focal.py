"""Focal loss (Lin et al. 2017): cross-entropy that down-weights easy examples by (1 - p_t)^gamma.

DiCLS keeps it as the fixed component supervising the classification head p^v. gamma = 0 and
alpha = None give plain (binary) cross-entropy, which is how the ablation's "+ BCE" row is run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Multi-label: logits [N, C], targets [N, C] in {0, 1} -> mean over all N*C entries (or [N, C]).

    One sigmoid, inside the numerically stable BCE-with-logits; alpha weights positives by
    alpha and negatives by 1 - alpha (None = no class weighting).
    """
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # [N, C]
    if gamma:
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)  # probability given to the true value
        ce = ce * (1 - p_t).pow(gamma)
    if alpha is not None:
        ce = ce * (alpha * targets + (1 - alpha) * (1 - targets))
    return ce.mean() if reduction == "mean" else ce


def softmax_focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, reduction: str = "mean"
) -> torch.Tensor:
    """Single-label: logits [N, C], labels [N] class indices -> mean over N (or [N])."""
    logp = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)  # [N] log p_y
    loss = -logp if not gamma else -((1 - logp.exp()).pow(gamma) * logp)
    return loss.mean() if reduction == "mean" else loss
