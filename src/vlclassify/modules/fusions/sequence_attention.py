"""A pre-norm transformer encoder over a mixed image/text token sequence (CMA-CLIP's sequence-wise
attention), built on the shared `MultiHeadAttention` so the attention maps can be returned."""

from __future__ import annotations

import torch
from torch import nn

from .cross_attention import MultiHeadAttention


class EncoderBlock(nn.Module):
    """x + SelfAttn(LN(x)), then x + FFN(LN(x)) (pre-norm: stable with few epochs and small lrs)."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.1, zero_init: bool = False) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout=dropout, zero_init_out=zero_init)
        ffn_out = nn.Linear(ffn_mult * dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(dropout), ffn_out)
        if zero_init:  # both residual branches start at 0: the block starts as the identity
            nn.init.zeros_(ffn_out.weight)
            nn.init.zeros_(ffn_out.bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D], pad [B, S] (True = padding) -> (x [B, S, D], attention [B, H, S, S])."""
        h = self.n1(x)
        a, w = self.attn(h, h, key_padding_mask=pad)
        x = x + self.drop(a)
        x = x + self.drop(self.ffn(self.n2(x)))
        return x, w


class SequenceEncoder(nn.Module):
    """`layers` encoder blocks and a final LayerNorm; returns every layer's attention map."""

    def __init__(
        self, dim: int, heads: int, layers: int, ffn_mult: int = 4, dropout: float = 0.1, zero_init: bool = False
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, ffn_mult, dropout, zero_init) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, S, D] -> (x [B, S, D], [attention [B, H, S, S]] per layer)."""
        maps = []
        for blk in self.blocks:
            x, w = blk(x, pad)
            maps.append(w)
        return self.norm(x), maps
