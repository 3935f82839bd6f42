"""A text encoder whose top trains while its frozen bottom is computed once per distinct text.

iCAR trains the text encoder together with the image side. On 2 CPU cores the affordable part is
the top: the frozen lower layers' outputs are cached per string (class sentences and captions
repeat every epoch), and only the top `train_layers` layers (deep copies: the backbone itself is
never modified) and an optional residual projection run with gradients.

Supported backbones:
- BERT-like text encoders with `backbone.text.encoder.layer` (the offline `effnet-minilm`):
  cache the hidden states after layer n-k, train layers n-k..n, mean-pool like the backbone;
- the `toy` backbone (`backbone.word`): train a copy of its word table;
- anything else: the backbone's text embeddings are frozen and cached; only the projection trains.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [N, L, H], mask [N, L] bool -> [N, H] mean over real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def tower_kind(backbone: Any) -> str:
    text = getattr(backbone, "text", None)
    if text is not None and hasattr(getattr(text, "encoder", None), "layer") and hasattr(backbone, "tokenize"):
        return "bert"
    if isinstance(getattr(backbone, "word", None), nn.Embedding) and hasattr(backbone, "tokenize"):
        return "toy"
    return "frozen"


class TrainableTextTower(nn.Module):
    """f_t(texts) -> [N, D] in the backbone's joint space, with a trainable top.

    train_layers: top encoder layers to train (BERT-like), or >0 to train the toy word table;
    0 freezes the encoder. proj: add a zero-initialised residual D x D projection (starts as identity).
    """

    backbone: Any  # duck-typed (see `tower_kind`): modules sit below backbones and never import them

    def __init__(self, backbone: Any, train_layers: int = 1, proj: bool = True, batch_size: int = 64) -> None:
        super().__init__()
        if train_layers < 0:
            raise ConfigError(f"text tower: train_layers must be >= 0, got {train_layers}")
        self.__dict__["backbone"] = backbone  # not a sub-module: its weights are not ours to save
        self.kind = tower_kind(backbone)
        self.batch_size = batch_size
        self.dim = int(backbone.embed_dim)
        self.train_layers = 0
        if self.kind == "bert":
            layers = backbone.text.encoder.layer
            if train_layers > len(layers):
                raise ConfigError(
                    f"text tower: train_layers={train_layers} but the text encoder has {len(layers)} layers"
                )
            self.train_layers = train_layers
            self.top = nn.ModuleList(copy.deepcopy(layers[len(layers) - train_layers + i]) for i in range(train_layers))
        elif self.kind == "toy" and train_layers > 0:
            self.train_layers = 1
            self.word = copy.deepcopy(backbone.word)
        self.proj = nn.Linear(self.dim, self.dim) if proj else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        for p in self.parameters():
            p.requires_grad_(True)
        self._cache: dict[str, torch.Tensor] = {}  # text -> frozen-bottom output ([L, H] or [D])
        self._memo: dict[str, torch.Tensor] = {}  # text -> final embedding [D], valid for _memo_version
        self._memo_version: tuple[int, ...] = ()

    # ---- frozen bottom, cached per distinct text -------------------------------------------
    @torch.no_grad()
    def _fill(self, texts: Sequence[str]) -> None:
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        bb = self.backbone
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            if self.kind == "bert":
                batch = bb.tokenize(chunk)
                was = bb.text.training
                bb.text.eval()
                out = bb.text(**batch, output_hidden_states=True)
                bb.text.train(was)
                n = len(bb.text.encoder.layer)
                hidden = out.hidden_states[n - self.train_layers]  # [B, L, H]: input of the first trained layer
                lengths = batch["attention_mask"].sum(1).tolist()
                for t, h, ln in zip(chunk, hidden, lengths):
                    self._cache[t] = (
                        h[: int(ln)].clone()
                        if self.train_layers
                        else _masked_mean(h[None, : int(ln)], torch.ones(1, int(ln), dtype=torch.bool))[0]
                    )
            elif self.kind == "toy" and self.train_layers:
                ids = bb.tokenize(chunk)
                for t, row, m in zip(chunk, ids["input_ids"], ids["attention_mask"]):
                    self._cache[t] = row[m.bool()].clone()
            else:
                emb = bb.encode_text(list(chunk)).embeds.float()  # [B, D]
                for t, e in zip(chunk, emb):
                    self._cache[t] = e.clone()

    def _pad(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack variable-length rows [L_i, ...] -> padded [N, L, ...] and mask [N, L] bool."""
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
        rows = [self._cache[t] for t in texts]
        if self.kind == "bert" and self.train_layers:
            hidden, mask = self._pad(rows)  # [N, L, H], [N, L]
            additive = (~mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min  # [N, 1, 1, L]
            for layer in self.top:
                out = layer(hidden, additive)
                hidden = out[0] if isinstance(out, tuple) else out
            emb = _masked_mean(hidden, mask)  # [N, H]
        elif self.kind == "toy" and self.train_layers:
            ids, mask = self._pad(rows)  # [N, L], [N, L]
            emb = _masked_mean(self.word(ids), mask)  # [N, D]
        else:
            emb = torch.stack(rows)  # [N, D]
        if self.proj is not None:
            emb = emb + self.proj(emb)
        return emb

    def clear_cache(self) -> None:
        self._cache.clear()
        self._memo.clear()
