"""Classification heads: the linear classifier (iCAR Eq. 1) and the cosine classifier (Eq. 3).

The cosine classifier scores `cos(W_j, v) / tau`: features and class weights are L2-normalised,
so the logits live on the same scale as an InfoNCE image-text loss. Its weights can be a
parameter (a plain classifier) or handed in per call (`weights=`), which is how a text encoder
acts as a meta classifier: the class weights are the text embeddings of the class sentences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearClassifier(nn.Module):
    """logits = W v + b (Eq. 1): the usual parametric head, kept for the ablation."""

    def __init__(self, dim: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes, bias=bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [N, D] -> logits [N, C]."""
        return self.fc(feats)


class CosineClassifier(nn.Module):
    """logits = cos(W_j, v) / tau (Eq. 3); tau fixed (paper: 0.05) or learnable (log-parametrised)."""

    def __init__(
        self, dim: int, num_classes: int = 0, tau: float = 0.05, learnable_tau: bool = False, tau_min: float = 0.01
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"cosine classifier: tau must be > 0, got {tau}")
        self.tau_min = tau_min
        # [C, D] parametric class weights; num_classes == 0 means weights come from the caller.
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim)) if num_classes else None
        log_inv_tau = torch.tensor(math.log(1.0 / tau))
        if learnable_tau:
            self.log_inv_tau = nn.Parameter(log_inv_tau)
        else:
            self.register_buffer("log_inv_tau", log_inv_tau)

    @property
    def scale(self) -> torch.Tensor:
        """1 / tau, capped at 1 / tau_min so a learnable temperature cannot run off to 0."""
        return self.log_inv_tau.exp().clamp(max=1.0 / self.tau_min)

    def forward(self, feats: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """feats [N, D], weights [C, D] (default: the parameter) -> logits [N, C]."""
        w = self.weight if weights is None else weights
        if w is None:
            raise ValueError("cosine classifier has no parametric weights: pass weights=[C, D]")
        return self.scale * F.normalize(feats, dim=-1) @ F.normalize(w, dim=-1).T
