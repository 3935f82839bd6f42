"""Triplet loss of image features against class prototypes (text features), hardest negative.

CMM (paper 002, eq. 6-8): D_ij = 1 - v̂_i · t̂_j (cosine distance, both sides re-normalised
because learnable prototypes drift off the unit sphere), positive = the true class, negative =
the closest wrong class, loss = mean_i max(0, D_pos - D_neg + margin).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototype_triplet_loss(
    feats: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """feats [B, D], protos [C, D], labels [B] -> scalar.

    The hardest negative is found without gradient on the full [B, C] distance matrix, then the
    loss is recomputed on the two gathered prototype rows only: the same value and gradient as
    the dense form (the max picks one row), but the backward pass touches 2 rows, not C.
    """
    v = F.normalize(feats.float(), dim=-1)  # [B, D]
    with torch.no_grad():
        t_all = F.normalize(protos.detach().float(), dim=-1)  # [C, D]
        dist = 1.0 - v @ t_all.T  # [B, C]
        dist.scatter_(1, labels[:, None], float("inf"))  # exclude the true class
        neg = dist.argmin(dim=1)  # [B] hardest (closest) wrong class
    t_pos = F.normalize(protos[labels].float(), dim=-1)  # [B, D]
    t_neg = F.normalize(protos[neg].float(), dim=-1)  # [B, D]
    d_pos = 1.0 - (v * t_pos).sum(-1)  # [B]
    d_neg = 1.0 - (v * t_neg).sum(-1)  # [B]
    return torch.clamp(d_pos - d_neg + margin, min=0.0).mean()


def prototype_triplet_loss_dense(
    feats: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Reference form (full distance matrix with gradient); used to check the fast one."""
    v = F.normalize(feats.float(), dim=-1)
    t = F.normalize(protos.float(), dim=-1)
    dist = 1.0 - v @ t.T  # [B, C]
    d_pos = dist.gather(1, labels[:, None]).squeeze(1)
    d_neg = dist.masked_fill(F.one_hot(labels, dist.shape[1]).bool(), float("inf")).min(dim=1).values
    return torch.clamp(d_pos - d_neg + margin, min=0.0).mean()
