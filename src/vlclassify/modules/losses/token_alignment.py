"""Cross-attention-based token alignment (DiCLS CTA, after MGCA's local alignment).

Each token of one modality gets a cross-modal embedding by attending over the other modality's
tokens (the attention module belongs to the model); a local InfoNCE then pulls every token
towards its own cross-modal embedding and away from the embeddings of the other tokens of the
same sample, in both directions (eq. 11-12). L_CTA = (L_LIA + L_LTA) / 2 (eq. 13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_infonce(
    tokens: torch.Tensor,
    cross: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> torch.Tensor:
    """tokens [N, T, D], cross [N, T, D] (token t's cross-modal embedding), mask [N, T] True = real token,
    weights [N, T] token importance (None = uniform) -> scalar: (InfoNCE(tok->cross) + InfoNCE(cross->tok)) / 2.

    Negatives are the other real tokens of the same sample; each sample's weights are
    normalised to sum to 1 over its real tokens, then samples are averaged.
    """
    n, t, _ = tokens.shape
    if mask is None:
        mask = torch.ones(n, t, dtype=torch.bool, device=tokens.device)
    a, b = F.normalize(tokens, dim=-1), F.normalize(cross, dim=-1)
    sim = a @ b.transpose(1, 2) / temperature  # [N, T, T]: token i vs cross-embedding j
    pad = ~mask
    target = torch.arange(t, device=tokens.device).expand(n, t).masked_fill(pad, -100).flatten()  # [N*T], pads ignored
    l1 = F.cross_entropy(sim.masked_fill(pad[:, None, :], float("-inf")).flatten(0, 1), target, reduction="none").view(
        n, t
    )  # tokens -> cross
    l2 = F.cross_entropy(
        sim.transpose(1, 2).masked_fill(pad[:, None, :], float("-inf")).flatten(0, 1), target, reduction="none"
    ).view(n, t)  # cross -> tokens
    w = torch.ones(n, t, device=tokens.device) if weights is None else weights.to(tokens.dtype)
    w = w * mask
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    per_token = (l1 + l2) / 2  # ignored (padding) anchors contribute 0
    return (w * per_token).sum(1).mean()


def cta_loss(
    image_tokens: torch.Tensor,
    image_cross: torch.Tensor,
    text_tokens: torch.Tensor,
    text_cross: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    temperature: float = 0.1,
    image_weights: torch.Tensor | None = None,
    text_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """image_tokens/image_cross [N, P, D] (patches, and their text-attended embeddings),
    text_tokens/text_cross [N, L, D] (words, and their image-attended embeddings), text_mask [N, L]
    True = real token -> L_CTA = (L_LIA + L_LTA) / 2."""
    lia = local_infonce(image_tokens, image_cross, None, image_weights, temperature)
    lta = local_infonce(text_tokens, text_cross, text_mask, text_weights, temperature)
    return (lia + lta) / 2
