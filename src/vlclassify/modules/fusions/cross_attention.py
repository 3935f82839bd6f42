"""Multi-head attention that returns its weights, and a transformer decoder block built on it.

General on purpose (VT-CLIP, CMA-CLIP, DiCLS use it): queries, keys and values may come from
different modalities, keys can be masked (padding), and the attention weights are returned so a
method can explain what a query looked at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConfigError


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with `heads` heads; q/k/v projections of width `dim`.

    forward(query [B, Lq, Dq], key [B, Lk, Dk], value [B, Lk, Dk] | None, key_padding_mask [B, Lk]
    (True = ignore) | None) -> (out [B, Lq, dim], weights [B, heads, Lq, Lk]).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        zero_init_out: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kdim or dim, dim)
        self.v = nn.Linear(vdim or kdim or dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        if zero_init_out:  # the block starts as the identity of its residual path
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, Lq, D] over key/value [B, Lk, D] -> (output [B, Lq, D], weights [B, H, Lq, Lk])."""
        value = key if value is None else value
        lq, lk, kd = query.shape[1], key.shape[1], key.shape[2]
        q = self._split(self.q(query))  # [B, H, Lq, hd]
        factor = value is key and lq * (self.dim + self.heads * lk) < lk * self.dim
        if factor:  # few queries, many keys: fold the key/value projections into the queries (same result)
            wk = self.k.weight.view(
                self.heads, self.head_dim, kd
            )  # k bias adds a per-query constant: softmax ignores it
            scores = torch.einsum("bhqk,blk->bhql", torch.einsum("bhqd,hdk->bhqk", q, wk), key)
        else:
            scores = q @ self._split(self.k(key)).transpose(-1, -2)
        scores = scores / self.head_dim**0.5  # [B, H, Lq, Lk]
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :].bool(), float("-inf"))
        w = torch.softmax(scores, dim=-1)
        w = torch.nan_to_num(w)  # a fully masked row attends to nothing instead of NaN
        wd = self.dropout(w)
        if factor:  # (w M) Wvᵀ + (Σw) bv == w (M Wvᵀ + bv)
            wv = self.v.weight.view(self.heads, self.head_dim, kd)
            o = torch.einsum("bhqk,hdk->bhqd", torch.einsum("bhql,blk->bhqk", wd, key), wv)
            o = o + self.v.bias.view(1, self.heads, 1, self.head_dim) * wd.sum(-1, keepdim=True)
        else:
            o = wd @ self._split(self.v(value))
        out = o.transpose(1, 2).reshape(query.shape[0], lq, self.dim)
        return self.out(out), w


@dataclass
class DecoderOutput:
    """What the cross-attention decoder returns: updated queries and the last layer's weights (for explanations)."""

    out: torch.Tensor  # [B, Lq, D] updated queries (without the block-external residual)
    cross_weights: torch.Tensor  # [B, H, Lq, Lk] cross-attention weights of the last layer


class DecoderBlock(nn.Module):
    """Transformer decoder layer (Vaswani et al.): self-attention over the queries, cross-attention
    queries -> memory, feed-forward; post-norm residuals inside the layer."""

    def __init__(
        self,
        dim: int,
        heads: int = 2,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        kdim: int | None = None,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.cross_attn = MultiHeadAttention(dim, heads, kdim=kdim, dropout=dropout)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * dim, dim)
        )
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.gate = nn.Parameter(torch.zeros(1)) if zero_init else None  # output scale; 0 = identity start

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Lq, D], memory [B, Lk, Dk] -> (delta [B, Lq, D], cross weights [B, H, Lq, Lk])."""
        x = self.n1(queries + self.self_attn(queries, queries, key_padding_mask=query_mask)[0])
        c, w = self.cross_attn(x, memory, key_padding_mask=memory_mask)
        x = self.n2(x + c)
        x = self.n3(x + self.ffn(x))
        if self.gate is not None:
            x = self.gate * x
        return x, w


class CrossAttentionDecoder(nn.Module):
    """`layers` decoder blocks; returns the refined queries and the last cross-attention map.

    With `residual=True` the input queries are added back (VT-CLIP eq. 5: VT = CrossAttn(V, V, T) + T).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 2,
        layers: int = 1,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        kdim: int | None = None,
        residual: bool = True,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ConfigError(f"cross-attention decoder: layers must be >= 1, got {layers}")
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, heads, ffn_mult, dropout, kdim=kdim, zero_init=zero_init and i == layers - 1)
            for i in range(layers)
        )
        self.residual = residual

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """queries [B, Lq, D] attending to memory [B, Lk, D] -> DecoderOutput."""
        x, w = queries, None
        for blk in self.blocks:
            x, w = blk(x, memory, memory_mask, query_mask)
        assert w is not None  # __init__ requires layers >= 1
        out = x + queries if self.residual else x
        return DecoderOutput(out=out, cross_weights=w)
