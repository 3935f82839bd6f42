"""ArcFace (Deng et al. 2019): an additive angular margin m on the true classes' angles.

logit_c = s * cos(theta_c + m) for true classes, s * cos(theta_c) otherwise, where theta_c is the
angle between the L2-normalised feature and class weight c. Single-label data uses softmax
cross-entropy (the original); multi-label data applies the same margin to every true class and
BCE-with-logits, so each label is pushed `m` radians past its decision boundary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ArcFaceHead(nn.Module):
    """Normalised class weights W [C, D]; forward(feats [N, D]) -> cosines [N, C]."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [N, D] -> cosines [N, C] with the class weights (the margin is the loss's)."""
        return F.normalize(feats, dim=-1) @ F.normalize(self.weight, dim=-1).T


def arcface_logits(cos: torch.Tensor, targets: torch.Tensor, scale: float = 16.0, margin: float = 0.3) -> torch.Tensor:
    """cos [N, C], targets [N, C] in {0, 1} -> margin-adjusted logits [N, C].

    Past theta = pi - m, cos(theta + m) stops decreasing; there the usual linear fallback
    cos - m * sin(m) keeps the logit monotonic (InsightFace's `th` / `mm`).
    """
    cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
    sin = (1 - cos * cos).sqrt()
    phi = cos * math.cos(margin) - sin * math.sin(margin)  # cos(theta + m)
    phi = torch.where(cos > math.cos(math.pi - margin), phi, cos - math.sin(math.pi - margin) * margin)
    return scale * torch.where(targets.bool(), phi, cos)


def arcface_loss(
    cos: torch.Tensor, targets: torch.Tensor, multilabel: bool, scale: float = 16.0, margin: float = 0.3
) -> torch.Tensor:
    """cos [N, C], targets [N, C] multi-hot (one-hot for single-label data) -> scalar loss."""
    logits = arcface_logits(cos, targets, scale, margin)
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets.argmax(-1))
