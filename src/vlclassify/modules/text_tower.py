"""A text encoder whose top trains while its frozen bottom is computed once per distinct text.

iCAR trains the text encoder together with the image side. On 2 CPU cores the affordable part is
the top: a backbone split's text trunk (`backbone.split(None, text_layers)`) runs once per distinct
string (class sentences and captions repeat every epoch) and its states are cached here; the
split's text top (its own copies of the last layers, so the backbone is never modified) and an
optional zero-initialised residual projection run with gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..backbones.base import BackboneSplit


class TrainableTextTower(nn.Module):
    """f_t(texts) -> [N, D] in the backbone's joint space: `split.text_top` over cached trunk states.

    split: a BackboneSplit with a text side (its parameters are this tower's `top.*`).
    proj: add a zero-initialised residual D x D projection (the tower starts as the backbone).
    """

    def __init__(self, split: BackboneSplit, proj: bool = True, batch_size: int = 64) -> None:
        super().__init__()
        self.top = split
        self.batch_size = batch_size
        self.dim = int(split.backbone.embed_dim)
        self.proj = nn.Linear(self.dim, self.dim) if proj else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        self._cache: dict[str, torch.Tensor] = {}  # text -> trunk states of its real tokens [L_i, H]
        self._memo: dict[str, torch.Tensor] = {}  # text -> final embedding [D], valid for _memo_version
        self._memo_version: tuple[int, ...] = ()

    # ---- frozen bottom, cached per distinct text -------------------------------------------
    def _fill(self, texts: Sequence[str]) -> None:
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            hidden, mask = self.top.text_trunk(chunk)  # [B, L, H], [B, L] (right-padded)
            for t, h, m in zip(chunk, hidden, mask):
                self._cache[t] = h[m].float().clone()

    def _pad(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack variable-length rows [L_i, H] -> padded [N, L, H] and mask [N, L] bool."""
        L = max(r.shape[0] for r in rows)
        out = rows[0].new_zeros((len(rows), L, *rows[0].shape[1:]))
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return out, mask

    # ---- trainable top --------------------------------------------------------------------
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """texts (N strings) -> [N, D] text embeddings (not normalised).

        Without gradients (inference, or a stage that freezes the tower) the final embeddings are
        memoised per text; the memo is dropped as soon as any weight changes (tensor versions).
        """
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._encode(texts)
        version = tuple(p._version for p in params) + (int(self.training),)
        if version != self._memo_version:
            self._memo, self._memo_version = {}, version
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            with torch.no_grad():
                for t, e in zip(todo, self._encode(todo)):
                    self._memo[t] = e
        return torch.stack([self._memo[t] for t in texts])

    def _encode(self, texts: list[str]) -> torch.Tensor:
        self._fill(texts)
        hidden, mask = self._pad([self._cache[t] for t in texts])  # [N, L, H], [N, L]
        emb = self.top.text_top(hidden, mask).embeds.float()  # [N, D]
        if self.proj is not None:
            emb = emb + self.proj(emb)
        return emb

    def clear_cache(self) -> None:
        """Forget the cached trunk states and embeddings (e.g. before the texts' backbone changes)."""
        self._cache.clear()
        self._memo.clear()
