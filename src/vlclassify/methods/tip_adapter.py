"""Tip-Adapter (Zhang et al. 2021): a training-free cache model over the few-shot features.

Keys K = the normalised training features (orig and flipped views averaged), values L = one-hot
labels; logits = zero-shot + alpha * exp(-beta * (1 - f Kᵀ)) L. Alpha and beta are searched on
the validation set, never on test. Alpha is in units of CLIP logits at scale 100 (it is rescaled
by logit_scale / 100 so the grid means the same on any backbone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..modules.cpu import cpu_threads
from .base import Encoded, Method, check_dim, normalize
from .registry import register_method
from .templates import cached_template_embeddings, resolve_templates


@dataclass
class TipAdapterConfig:
    templates: str | list[str] = "select7"  # prompt templates for the zero-shot classifier
    alpha_grid: list[float] = field(
        default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
    )  # residual weights tried on val
    beta_grid: list[float] = field(
        default_factory=lambda: [0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0]
    )  # sharpness values tried on val
    alpha: float = 1.0  # used when there is no validation set (Tip-Adapter's default)
    beta: float = 1.0  # used when there is no validation set (Tip-Adapter's default)


@register_method
class TipAdapter(Method):
    """Training-free cache model: zero-shot + alpha * exp(-beta(1 - f·K)) · one-hot; alpha/beta on val."""

    name = "tip-adapter"
    Config = TipAdapterConfig
    train_views = ("orig", "flip")

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        self.templates = resolve_templates(self.config.templates)
        self.class_embeds: torch.Tensor | None = None  # [C, D]
        self.keys: torch.Tensor | None = None  # [N, D]
        self.values: torch.Tensor | None = None  # [N, C] one-hot
        self.alpha, self.beta = self.config.alpha, self.config.beta

    @property
    def scale(self) -> float:
        return float(self.backbone.logit_scale)

    def _cache_keys(self, train: Encoded) -> torch.Tensor:
        f = train.features
        views = [normalize(f.image)] + [normalize(f.views[v].image) for v in self.train_views[1:] if v in f.views]
        return normalize(torch.stack(views).mean(0))  # [N, D] augmentation-averaged keys

    def _parts(self, data: Encoded, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> zero-shot logits [N, C], affinities f·Kᵀ [N, N_train]."""
        x = normalize(data.features.image)
        check_dim(x, self.class_embeds.shape[1], self.name)
        return self.scale * x @ self.class_embeds.T, x @ (self.keys if keys is None else keys).T

    def _combine(self, zs, aff, alpha, beta, values=None) -> torch.Tensor:
        cache = torch.exp(-beta * (1 - aff)) @ (self.values if values is None else values)  # [N, C]
        return zs + alpha * (self.scale / 100.0) * cache

    def _search(self, val: Encoded | None, keys=None) -> dict:
        if val is None or not len(val):
            return {"alpha": self.alpha, "beta": self.beta, "source": "default"}
        zs, aff = self._parts(val, keys)
        y = torch.as_tensor(val.dataset.labels())
        best, table = None, {}
        for b in self.config.beta_grid:
            for a in self.config.alpha_grid:
                z = self._combine(zs, aff, a, b)
                acc = float((z.argmax(-1) == y).float().mean())
                nll = float(F.cross_entropy(z, y))
                table[f"{a},{b}"] = round(acc, 4)
                if best is None or (acc, -nll) > best[0]:
                    best = ((acc, -nll), a, b)
        self.alpha, self.beta = best[1], best[2]
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "source": "validation",
            "val_accuracy": best[0][0],
            "val_accuracy_by_alpha_beta": table,
        }

    def _build(self, train: Encoded) -> None:
        self.class_embeds = cached_template_embeddings(self.backbone, self.classnames, self.templates, self.cache)[
            1
        ].clone()
        self.keys = self._cache_keys(train)
        self.values = F.one_hot(torch.as_tensor(train.dataset.labels()), len(self.classnames)).float()

    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        self._build(train)
        with torch.no_grad(), cpu_threads(len(val or []) * len(self.keys) * self.keys.shape[1]):
            self.fit_info = self._search(val)

    def _logits(self, data: Encoded) -> torch.Tensor:
        zs, aff = self._parts(data)
        return self._combine(zs, aff, self.alpha, self.beta)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "class_embeds": self.class_embeds,
            "keys": self.keys,
            "values": self.values,
            "alpha_beta": torch.tensor([self.alpha, self.beta], dtype=torch.float64),
        }

    def load_tensors(self, tensors) -> None:
        self.class_embeds, self.keys, self.values = tensors["class_embeds"], tensors["keys"], tensors["values"]
        self.alpha, self.beta = (float(v) for v in tensors["alpha_beta"])
