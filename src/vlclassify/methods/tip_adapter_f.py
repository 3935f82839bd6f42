"""Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (AdamW, cosine schedule, CE on the
fused logits at the training alpha/beta), then alpha/beta searched again on validation. The epoch
to keep is chosen on validation too (the public code picks it on test; a known flaw, not repeated)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..training import Stage
from .base import Encoded, TrainOptions
from .registry import register_method
from .tip_adapter import TipAdapter, TipAdapterConfig


@dataclass
class TipAdapterFConfig(TipAdapterConfig, TrainOptions):
    epochs: int = 20  # fine-tuning epochs over the (flip-augmented) training set (Tip-Adapter-F: 20)
    lr: float = 1e-3  # AdamW learning rate (Tip-Adapter-F: 1e-3)
    weight_decay: float = 0.01  # AdamW weight decay (Tip-Adapter-F: torch's default, 0.01)
    batch_size: int = 256  # (Tip-Adapter-F: 256)
    train_alpha: float = 1.0  # alpha during fine-tuning (Tip-Adapter-F: the dataset's init_alpha)
    train_beta: float = 1.0  # beta during fine-tuning (Tip-Adapter-F: the dataset's init_beta)
    # keys re-normalised in every forward (False: a plain linear layer, as the paper's code)
    normalize_keys: bool = True


@register_method
class TipAdapterF(TipAdapter):
    """Tip-Adapter with fine-tuned cache keys; epoch, alpha and beta chosen on validation."""

    name = "tip-adapter-f"
    Config = TipAdapterFConfig
    train_keys = True
    selects = "epoch, alpha, beta"

    def stages(self, train: Encoded) -> list[Stage]:
        c = self.config
        return [
            Stage(
                "keys",
                epochs=c.epochs,
                lr=c.lr,
                weight_decay=c.weight_decay,
                eps=1e-4,
                batch_size=c.batch_size,
                schedule="cosine",
            )
        ]

    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        c = self.config
        head = self._build(train)
        head.alpha_beta.copy_(torch.tensor([c.train_alpha, c.train_beta], dtype=torch.float64))
        n = 2 * len(train)
        result = self.train_head(train, val, self.stages(train), work=min(n, c.batch_size) * n * head.keys.shape[1])
        self.fit_info.update(self.search(val))
        self.fit_info["epoch"] = result.stages[0].best_epoch
