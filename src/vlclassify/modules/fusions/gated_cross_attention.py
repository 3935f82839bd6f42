"""Bidirectional cross-attention with learnable tanh gates (DiCLS XMA-B, Flamingo-style gating).

    v_delta, t_delta = XMA-B(v, t):  v_delta = tanh(g_v) * CrossAttn(v <- t)
                                     t_delta = tanh(g_t) * CrossAttn(t <- v)
    and the caller adds them: v + v_delta, t + t_delta (DiCLS eq. 7-9).

The gates MULTIPLY the attention output (the public DiCLS code added tanh(g) instead, which
shifts features by a constant and never switches the attention off). With g initialised at 0
the block starts as the identity of its residual path, so pre-trained features pass through
unchanged until the gates open. Gates are per channel (a "gate matrix" per direction) or scalar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cross_attention import MultiHeadAttention


@dataclass
class GatedCrossOutput:
    """Both directions of gated cross-attention with their weights (for the losses and explanations)."""

    image: torch.Tensor  # [B, Nv, D] gated text->image attention output (O_t2i)
    text: torch.Tensor  # [B, Nt, D] gated image->text attention output (P_i2t)
    image_weights: torch.Tensor  # [B, H, Nv, Nt] where each image token looked in the text
    text_weights: torch.Tensor  # [B, H, Nt, Nv] where each text token looked in the image


class GatedBiCrossAttention(nn.Module):
    """XMA-B: pre-norm cross-attention both ways, outputs scaled by tanh of learnable gates."""

    def __init__(
        self, dim: int, heads: int = 4, dropout: float = 0.0, gate_init: float = 0.0, per_channel: bool = True
    ) -> None:
        super().__init__()
        self.norm_v, self.norm_t = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.t2i = MultiHeadAttention(dim, heads, dropout=dropout)  # image queries, text keys/values
        self.i2t = MultiHeadAttention(dim, heads, dropout=dropout)  # text queries, image keys/values
        shape = (dim,) if per_channel else (1,)
        self.gate_v = nn.Parameter(torch.full(shape, float(gate_init)))  # [D] or [1]
        self.gate_t = nn.Parameter(torch.full(shape, float(gate_init)))

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        image_pad: torch.Tensor | None = None,
        text_pad: torch.Tensor | None = None,
    ) -> GatedCrossOutput:
        """image [B, Nv, D], text [B, Nt, D], *_pad [B, N*] True = padding (ignored as keys)."""
        v, t = self.norm_v(image), self.norm_t(text)
        a_v, w_v = self.t2i(v, t, key_padding_mask=text_pad)  # [B, Nv, D]
        a_t, w_t = self.i2t(t, v, key_padding_mask=image_pad)  # [B, Nt, D]
        return GatedCrossOutput(torch.tanh(self.gate_v) * a_v, torch.tanh(self.gate_t) * a_t, w_v, w_t)
