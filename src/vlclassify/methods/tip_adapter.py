"""Tip-Adapter (Zhang et al. 2021): a training-free cache model over the few-shot features.

Keys K = the normalised training features averaged over augmented views (default: orig and flip,
each normalised; Tip-Adapter's protocol, `--preset tip-adapter`: the raw features of 10
random-resized-crop + flip views averaged, then normalised), values L = one-hot labels;
logits = zero-shot + alpha * exp(-beta * (1 - f Kᵀ)) L. Alpha and beta are searched on the
validation set, never on test (the one selection rule over the beta-major grid: the best accuracy
wins, ties go to the pair nearest the default alpha, beta; Tip-Adapter's "first strict
improvement" when the default is off the grid, as in its preset). Alpha is in
units of CLIP logits at scale 100 (it is rescaled by logit_scale / 100 so the grid means the same
on any backbone).

Two inputs for the cache (`input`): `joint`, the paper's form, keys and queries are joint
embeddings; `pooled` (default), they are the pooled visual features, so affinities are measured in
the richer visual space (the same thing for CLIP up to its projection, far apart for a ConSE
join whose embeddings crowd together). The zero-shot logits read the joint embedding in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..features.extract import VIEWS
from ..features.protocol import Features
from ..training import select_best
from .base import Encoded, Method, check_dim, feature_keys, normalize
from .registry import register_method
from .tags import Tags
from .templates import resolve_templates


@dataclass(frozen=True)
class TipAdapterConfig:
    """Tip-Adapter's options: templates, the alpha / beta grids searched on validation and the cache keys."""

    templates: str | list[str] = "select7"  # prompt templates for the zero-shot classifier
    # residual weights tried on val, smallest (nearest zero-shot) first
    alpha_grid: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0])
    beta_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0])  # sharpness
    alpha: float = 1.0  # used when there is no validation set (Tip-Adapter's default)
    beta: float = 1.0  # used when there is no validation set (Tip-Adapter's default)
    # training-image views whose features make the keys (features/extract.py VIEWS; Tip-Adapter: rrc0..rrc9)
    views: list[str] = field(default_factory=lambda: ["orig", "flip"])
    # normalized: each view's features normalised, then averaged | raw: the raw features averaged
    # (Tip-Adapter's code); the mean is normalised either way
    key_mean: str = "normalized"
    input: str = "pooled"  # pooled: cache keys and queries are the pooled visual features | joint: the paper's

    method: ClassVar[str] = "tip-adapter"  # the name errors give

    def __post_init__(self) -> None:
        unknown = [v for v in self.views if v not in VIEWS]
        if not self.views or unknown:
            raise ConfigError(
                f"{self.method}: views must be a non-empty list of {', '.join(VIEWS)}; got {unknown or self.views}"
            )
        if self.key_mean not in ("normalized", "raw"):
            raise ConfigError(f"{self.method}: key_mean must be normalized or raw, got {self.key_mean!r}")
        if self.input not in ("pooled", "joint"):
            raise ConfigError(f"{self.method}: input must be pooled or joint, got {self.input!r}")


def search_grid(top: float, steps: int, start: float = 0.1) -> list[float]:
    """Tip-Adapter's search values: `steps` evenly spaced from `start`, below `top` (its yaml's
    search_scale / search_step: i * (top - start) / steps + start for i in 0..steps-1)."""
    return [i * (top - start) / steps + start for i in range(steps)]


def view_features(f: Features, view: str, method: str) -> Features:
    """The features of one extracted view ("orig" is the FeatureSet itself)."""
    if view == "orig":
        return f
    if view not in f.views:
        raise ConfigError(f"method {method!r}: the training features have no {view!r} view")
    return f.views[view]


class CacheHead(nn.Module):
    """Zero-shot logits plus the cache model's affinity-weighted one-hot labels.

    batch {"image": [B, D], "pooled": [B, F] (pooled keys)} -> {"logits": [B, C]}; with "targets" also
    {"loss"} (cross-entropy on the fused logits, for Tip-Adapter-F's fine-tuning of the keys)."""

    def __init__(
        self,
        num_classes: int,
        num_keys: int,
        dim: int,
        scale: float,
        train_keys: bool = False,
        normalize_keys: bool = True,
        key_dim: int = 0,
    ) -> None:
        """key_dim: the width of the keys when they are pooled features (0: the joint space, `dim`)."""
        super().__init__()
        self.scale, self.normalize_keys = scale, normalize_keys
        self.query = "pooled" if key_dim else "image"  # the batch feature compared with the keys
        self.class_embeds: torch.Tensor  # the buffers below (keys: a buffer, or a Parameter when trained)
        self.keys: torch.Tensor
        self.values: torch.Tensor
        self.alpha_beta: torch.Tensor
        self.register_buffer("class_embeds", torch.zeros(num_classes, dim))  # [C, D] zero-shot classifier
        keys = torch.zeros(num_keys, key_dim or dim)  # [N, D or F] normalised training features
        if train_keys:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.register_buffer("values", torch.zeros(num_keys, num_classes))  # [N, C] one-hot labels
        self.register_buffer("alpha_beta", torch.tensor([1.0, 1.0], dtype=torch.float64))  # current (alpha, beta)

    def parts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """batch -> zero-shot logits [B, C] (joint embedding), affinities f·Kᵀ [B, N] (the keys' features)."""
        image, query = batch["image"], batch[self.query]
        check_dim(image, self.class_embeds.shape[1], "tip-adapter")
        check_dim(query, self.keys.shape[1], f"tip-adapter ({self.query})")
        keys = F.normalize(self.keys, dim=-1) if self.normalize_keys else self.keys
        return self.scale * normalize(image) @ self.class_embeds.T, normalize(query) @ keys.T

    def cache_logits(self, aff: torch.Tensor, beta: float) -> torch.Tensor:
        """affinities [B, N] -> the cache model's logits [B, C] at alpha = 1 (in zero-shot logit units)."""
        return (self.scale / 100.0) * (torch.exp(-beta * (1 - aff)) @ self.values)

    def combine(self, zs: torch.Tensor, aff: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """Zero-shot logits plus alpha times the cache logits at sharpness beta."""
        return zs + alpha * self.cache_logits(aff, beta)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {image [B, D], pooled [B, F] (pooled keys)} -> fused logits [B, C] at the stored alpha,
        beta (and the loss with targets)."""
        alpha, beta = (float(v) for v in self.alpha_beta)
        z = self.combine(*self.parts(batch), alpha, beta)
        out = {"logits": z}
        if "targets" in batch:
            out["loss"] = F.cross_entropy(z, batch["targets"])
        return out


@register_method
class TipAdapter(Method):
    """Training-free cache model: zero-shot + alpha * exp(-beta(1 - f·K)) · one-hot; alpha/beta on val."""

    name = "tip-adapter"
    tags = Tags(update=True, onnx=True)
    Config = TipAdapterConfig
    needs = frozenset({"image", "pooled"})  # pooled: input=pooled
    train_views = ("orig", "flip")  # the default `views`; the option chooses them
    selects = "alpha, beta"
    train_keys = False  # Tip-Adapter-F fine-tunes them

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        self.templates = resolve_templates(self.config.templates)

    def feature_needs(self) -> frozenset[str]:
        return self.needs if self.config.input == "pooled" else frozenset({"image"})

    @property
    def key_feature(self) -> str:
        """The FeatureSet field the cache keys (and queries) are: pooled or image."""
        return "pooled" if self.config.input == "pooled" else "image"

    def training_views(self) -> tuple[str, ...]:
        return ("orig", *dict.fromkeys(v for v in self.config.views if v != "orig"))

    @property
    def scale(self) -> float:
        """The backbone's logit scale (CLIP's temperature)."""
        return float(self.backbone.logit_scale)

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        return CacheHead(
            spec["num_classes"],
            spec["num_keys"],
            spec["dim"],
            self.scale,
            self.train_keys,
            getattr(self.config, "normalize_keys", True),
            spec.get("key_dim", 0),
        )

    def _build(self, train: Encoded) -> CacheHead:
        """The cache model of `train`: keys, one-hot values, the zero-shot classifier."""
        c = self.config
        views = [view_features(train.features, v, self.name).tensor(self.key_feature).float() for v in c.views]
        if c.key_mean == "normalized":
            views = [normalize(x) for x in views]
        keys = normalize(torch.stack(views).mean(0))  # [N, D or F] augmentation-averaged keys
        text = self.class_texts(self.templates)[1]
        head = cast(CacheHead, self.init_head(self.cache_spec(len(keys), keys.shape[1], text.shape[1])))
        with torch.no_grad():
            head.class_embeds.copy_(text)
            head.keys.copy_(keys)
            head.values.copy_(F.one_hot(torch.as_tensor(train.dataset.labels()), len(self.classnames)).float())
        return head

    def cache_spec(self, num_keys: int, key_dim: int, dim: int) -> dict[str, Any]:
        """The head spec of a cache of `num_keys` keys of width `key_dim` (pooled keys) or `dim` (joint)."""
        spec = {"num_classes": len(self.classnames), "num_keys": num_keys, "dim": dim}
        return spec | ({"key_dim": key_dim} if self.config.input == "pooled" else {})

    def search(self, val: Encoded | None) -> dict[str, Any]:
        """Choose (alpha, beta) on validation (the selection rule; beta outer, alpha inner)."""
        head = cast(CacheHead, self.head)  # built by _build
        c = self.config
        if val is None or not len(val):
            head.alpha_beta.copy_(torch.tensor([c.alpha, c.beta], dtype=torch.float64))
            return {"alpha": c.alpha, "beta": c.beta, "alpha_beta_source": "default (no validation set)"}
        with torch.no_grad():
            zs, aff = head.parts(val.features.batch(feature_keys(self.feature_needs()), 0, len(val)))
        y = torch.as_tensor(val.dataset.labels())
        grid = [(a, b) for b in c.beta_grid for a in c.alpha_grid]
        memo: dict[float, torch.Tensor] = {}  # the cache logits of the current beta (the grid is beta-major)

        def accuracy(ab: tuple[float, float]) -> float:
            alpha, beta = ab
            if beta not in memo:
                memo.clear()
                memo[beta] = head.cache_logits(aff, beta)
            return float(((zs + alpha * memo[beta]).argmax(-1) == y).float().mean())

        sel = select_best(grid, accuracy, (c.alpha, c.beta) if (c.alpha, c.beta) in grid else None)
        head.alpha_beta.copy_(torch.tensor(sel.best, dtype=torch.float64))
        return {**sel.info("alpha_beta"), "alpha": sel.best[0], "beta": sel.best[1]}

    def fit_head(self, train: Encoded, val: Encoded | None) -> None:
        self._build(train)
        self.fit_info = self.search(val)

    def _update(self, train, val, classes, descriptions):
        """The cache model grows: new examples become keys, new classes get zero-shot rows."""
        old = cast(CacheHead, self.head)
        n_old, c_old = old.keys.shape[0], len(self.classnames)
        self.classnames, self.task_classes = list(classes), {"label": list(classes)}
        self.class_text = None
        extra = self._build(self.encode(train, training=True)) if train is not None else None
        keys = old.keys.detach() if extra is None else torch.cat([old.keys.detach(), extra.keys.detach()])
        values = F.pad(old.values, (0, len(classes) - c_old))  # [N_old, C]: old keys keep their labels
        if extra is not None:
            values = torch.cat([values, extra.values])
        text = self.class_texts(self.templates)[1]
        head = cast(CacheHead, self.init_head(self.cache_spec(len(keys), keys.shape[1], text.shape[1])))
        with torch.no_grad():
            head.class_embeds.copy_(text)
            head.keys.copy_(keys)
            head.values.copy_(values)
            head.alpha_beta.copy_(old.alpha_beta)
        if val is not None:
            self.fit_info.update(self.search(self.encode(val)))
        head.requires_grad_(False).eval()
        return f"{len(keys) - n_old} key(s) added to the cache" + (
            "; new keys are not fine-tuned (refit to fine-tune them)" if self.train_keys else ""
        )
