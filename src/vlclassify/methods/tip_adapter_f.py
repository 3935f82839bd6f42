"""Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (AdamW, cosine schedule, CE on the
fused logits at the training alpha/beta), then alpha/beta searched again on validation. The epoch
to keep is chosen on validation too (the public code picks it on test; a known flaw, not repeated:
docs/reproducing.md measures what it changes).

Training samples per epoch (`epoch_views`): `all` trains on every cached view of every image each
epoch (orig + flip: 2N rows); `cycle` trains epoch e on view e mod len(views) only, N rows an epoch.
With Tip-Adapter's 10 augmented views (`--preset tip-adapter`) that is its "N freshly augmented
samples an epoch" on cached features: the views are fixed per image, so 20 epochs see each twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..training import Stage, TrainResult
from .base import Encoded, Feed, TrainConfig, TrainOptions, feature_keys
from .registry import register_method
from .tags import Tags
from .tip_adapter import TipAdapter, TipAdapterConfig, view_features


@dataclass(frozen=True)
class TipAdapterFConfig(TipAdapterConfig, TrainOptions):
    """Tip-Adapter-F's options: Tip-Adapter's plus the key fine-tuning schedule."""

    epochs: int = 20  # fine-tuning epochs (Tip-Adapter-F: 20, EuroSAT 100)
    # AdamW at learning rate 1e-3, weight decay 0.01 (torch's default), batch 256: Tip-Adapter-F's
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, weight_decay=0.01, batch_size=256))
    train_alpha: float = 1.0  # alpha during fine-tuning (Tip-Adapter-F: the dataset's init_alpha)
    train_beta: float = 1.0  # beta during fine-tuning (Tip-Adapter-F: the dataset's init_beta)
    # keys re-normalised in every forward (False: a plain linear layer, as the paper's code)
    normalize_keys: bool = True
    # all: every view of every image each epoch | cycle: epoch e trains on view e mod len(views) (Tip-Adapter-F)
    epoch_views: str = "all"

    method: ClassVar[str] = "tip-adapter-f"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epoch_views not in ("all", "cycle"):
            raise ConfigError(f"tip-adapter-f: epoch_views must be all or cycle, got {self.epoch_views!r}")


@register_method
class TipAdapterF(TipAdapter):
    """Tip-Adapter with fine-tuned cache keys; epoch, alpha and beta chosen on validation."""

    name = "tip-adapter-f"
    tags = Tags(update=True, onnx=True)
    Config: ClassVar[type[TipAdapterConfig]] = TipAdapterFConfig
    train_keys = True
    selects = "epoch, alpha, beta"

    def stages(self, train: Encoded) -> list[Stage]:
        c = self.config
        return [
            Stage(
                "keys",
                epochs=c.epochs,
                lr=c.train.lr,
                weight_decay=c.train.weight_decay,
                eps=1e-4,
                batch_size=c.train.batch_size,
                schedule="cosine",
            )
        ]

    def view_batches(self, train: Encoded):
        """The Trainer's batches: the views' features as samples, all of them or one view an epoch."""
        c = self.config
        keys = feature_keys(self.feature_needs())
        feats = [view_features(train.features, v, self.name) for v in c.views]
        views = [{k: f.tensor(k).float() for k in keys} for f in feats]  # V x {image [N, D], pooled [N, F]}
        y = torch.as_tensor(train.dataset.labels())
        if c.epoch_views == "all":
            rows = {k: torch.cat([v[k] for v in views]) for k in keys}
            return self.feature_batches(train, {**rows, "targets": y.repeat(len(views))})
        per_view = [self.feature_batches(train, {**v, "targets": y}) for v in views]
        return lambda stage, epoch, seed: per_view[epoch % len(per_view)](stage, epoch, seed)

    def prepare(self, train: Encoded, val: Encoded | None) -> Feed:
        """The cache model of the training set, its keys trained at the training alpha and beta."""
        c = self.config
        head = self._build(train)
        head.alpha_beta.copy_(torch.tensor([c.train_alpha, c.train_beta], dtype=torch.float64))
        return Feed(batches=self.view_batches(train))

    def finish(self, val: Encoded | None, result: TrainResult) -> None:
        self.fit_info.update(self.search(val))
        self.fit_info["epoch"] = result.stages[0].best_epoch
