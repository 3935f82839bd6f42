"""Keyless attention over modalities (Long et al., AAAI 2018; CMA-CLIP eqs. 3-6).

Each modality's embedding gets a score from one learned vector, e_m = w^T x_m, and the fused
embedding is the softmax-weighted sum: with two modalities, c = lambda I' + (1 - lambda) T'.
"Keyless" because there is no query: the weights say how much each modality matters for the task
the block belongs to, so one block per task lets color trust the image and style the text.
"""

from __future__ import annotations

import torch
from torch import nn


class KeylessAttention(nn.Module):
    """forward(x [N, M, D], present [N, M] bool | None) -> (c [N, D], weights [N, M]).

    `present=False` marks a missing modality (no image, empty text): it gets weight 0 and the
    others share the mass. `fixed=True` (the "without modality attention" ablation) ignores w and
    averages the present modalities with equal weights.
    """

    def __init__(self, dim: int, fixed: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))  # zero init: the block starts as the plain average
        self.fixed = fixed

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, M, D] -> e [N, M]."""
        return x @ self.w if not self.fixed else torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, M, D] -> (weighted sum [N, D], weights [N, M]); absent modalities get weight 0."""
        e = self.scores(x)  # [N, M]
        if present is not None:
            if not bool(present.any(-1).all()):
                raise ValueError("keyless attention: a row has no modality present")
            e = e.masked_fill(~present.bool(), float("-inf"))
        weights = torch.softmax(e, dim=-1)  # [N, M]
        return (weights.unsqueeze(-1) * x).sum(1), weights
