"""Cross-modal prototype alignment (DiCLS CPA, from MGCA) with Sinkhorn-Knopp assignments (SwAV).

Image and text global features are softly clustered onto K shared, learnable prototypes. The
Sinkhorn-Knopp assignments q (equal-partition constraint, no gradient) of one modality are the
targets for the other modality's prototype softmax h (swapped prediction, eq. 14-17).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """scores [B, K] (feature-prototype similarities) -> assignments [B, K], rows summing to 1.

    Alternately normalises the K prototype rows to mass 1/K and the B sample columns to 1/B,
    so prototypes get used about equally (column sums ~ B/K after the final rescale).
    """
    q = torch.exp((scores - scores.max()) / eps).T.double()  # [K, B]
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True).clamp_min(1e-300)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-300)
        q /= b
    return (q * b).T.to(scores.dtype)  # [B, K]


def prototype_alignment_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float = 0.1,
    eps: float = 0.05,
    iters: int = 3,
) -> torch.Tensor:
    """image [N, D], text [N, D] global features, prototypes [K, D] -> L_CPA (scalar).

    L(o) = -sum_k q_t,k log h_o,k and L(p) = -sum_k q_o,k log h_p,k, averaged over the batch;
    L_CPA = (L(o) + L(p)) / 2.
    """
    w = F.normalize(prototypes, dim=-1)
    s_img = F.normalize(image, dim=-1) @ w.T  # [N, K]
    s_txt = F.normalize(text, dim=-1) @ w.T  # [N, K]
    q_img, q_txt = sinkhorn_knopp(s_img, eps, iters), sinkhorn_knopp(s_txt, eps, iters)
    l_img = -(q_txt * F.log_softmax(s_img / temperature, dim=-1)).sum(-1).mean()
    l_txt = -(q_img * F.log_softmax(s_txt / temperature, dim=-1)).sum(-1).mean()
    return (l_img + l_txt) / 2
