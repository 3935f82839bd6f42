"""Nearest class mean: a complete vlclassify method in one file (docs/extending.md walks through it).

Each class is the mean of its training images' normalised features; an image scores each class by
cosine similarity to that mean, divided by a temperature. Nothing is trained, so the method
provides `fit_head` (no `stages`); its head is a module whose forward maps a feature batch to
logits, so saving, loading, predicting and the ONNX export come from the base class.

    import nearest_mean                      # registers "nearest-mean"
    from vlclassify.testing import check_method
    check_method(nearest_mean.NearestMean)   # every check its declarations and tags call for
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlclassify.errors import ConfigError
from vlclassify.methods import Encoded, Method, register_method
from vlclassify.methods.base import SINGLE, normalize
from vlclassify.methods.tags import Tags

FEATURES = ("pooled", "image")


@dataclass(frozen=True)
class NearestMeanConfig:
    """The options: which feature is averaged, and the softmax temperature."""

    feature: str = "pooled"  # pooled (raw visual features) | image (joint-space embedding)
    temperature: float = 0.05  # cosine / temperature = logits

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ConfigError(f"nearest-mean: feature must be one of {', '.join(FEATURES)}, got {self.feature!r}")
        if self.temperature <= 0:
            raise ConfigError(f"nearest-mean: temperature must be > 0, got {self.temperature}")


class MeanHead(nn.Module):
    """batch {feature: [B, F]} -> {"logits": cos(x, mean_c) / temperature [B, C]}."""

    means: torch.Tensor  # [C, F] buffer: saved in model.safetensors with the head

    def __init__(self, feature: str, num_classes: int, dim: int, temperature: float) -> None:
        super().__init__()
        self.feature, self.temperature = feature, temperature
        self.register_buffer("means", torch.zeros(num_classes, dim))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {feature [B, F]} -> logits [B, C]."""
        return {"logits": normalize(batch[self.feature]) @ normalize(self.means).T / self.temperature}


@register_method
class NearestMean(Method):
    """Nearest class mean of normalised features (training-free)."""

    name = "nearest-mean"
    Config = NearestMeanConfig
    kinds = frozenset({SINGLE})  # multi-label data is refused before any extraction
    needs = frozenset({"pooled"})  # the default option's feature; feature_needs follows the option
    tags = Tags(onnx=True)  # one head over the backbone's image features: exportable

    def feature_needs(self) -> frozenset[str]:
        return frozenset({self.config.feature})

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        return MeanHead(self.config.feature, spec["num_classes"], spec["dim"], self.config.temperature)

    def fit_head(self, train: Encoded, val: Encoded | None) -> None:
        x = normalize(train.features.tensor(self.config.feature))  # [N, F]
        y = torch.as_tensor(train.dataset.labels())  # [N]
        means = torch.zeros(len(self.classnames), x.shape[1]).index_add_(0, y, x)  # [C, F] sums
        head = self.init_head({"num_classes": len(self.classnames), "dim": x.shape[1]})
        head.means.copy_(means)
