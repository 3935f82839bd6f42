"""Tip-Adapter (Zhang et al. 2021): a training-free cache model over the few-shot features.

Keys K = the normalised training features averaged over augmented views (default: orig and flip,
each normalised; Tip-Adapter's protocol, `--preset tip-adapter`: the raw features of 10
random-resized-crop + flip views averaged, then normalised), values L = one-hot labels;
logits = w_zs * zero-shot + alpha * exp(-beta * (1 - f Kᵀ)) L. The weights and beta are searched
on the validation set, never on test (the one selection rule over the beta-major grid: the best
accuracy wins, ties go to the candidate nearest the default; Tip-Adapter's "first strict
improvement" when the default is off the grid, as in its preset).

Two weight grids (`fusion_grid`): `spread` (default), training/fusion.py's grid from zero-shot only
to cache only in units of the two logit sets' spread on the training data, so a weak prior can be
outvoted; `alpha`, the paper's: w_zs = 1 and `alpha_grid` in units of CLIP logits at scale 100
(rescaled by logit_scale / 100 so the grid means the same on any backbone), what the
`tip-adapter` and `coop-*` presets search.

Two inputs for the cache (`input`): `joint`, the paper's form, keys and queries are joint
embeddings; `pooled` (default), they are the pooled visual features, so affinities are measured in
the richer visual space (the same thing for CLIP up to its projection, far apart for a ConSE
join whose embeddings crowd together). The zero-shot logits read the joint embedding in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..features.extract import VIEWS
from ..features.protocol import Features
from ..training import select_best
from ..training.fusion import DEFAULT_RATIO, RATIOS, ratio_weights, spread_scale
from .base import Encoded, Method, check_dim, feature_keys, normalize
from .registry import register_method
from .tags import Tags
from .templates import resolve_templates


@dataclass(frozen=True)
class TipAdapterConfig:
    """Tip-Adapter's options: templates, the alpha / beta grids searched on validation and the cache keys."""

    templates: str | list[str] = "select7"  # prompt templates for the zero-shot classifier
    # spread: zero-shot only .. cache only, relative to the logits' spread (training/fusion.py) | alpha: alpha_grid
    fusion_grid: str = "spread"
    # residual weights tried on val with fusion_grid=alpha, smallest (nearest zero-shot) first
    alpha_grid: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0])
    # sharpness; up to 50 so that a cache that outvotes the prior can be a near-neighbour vote
    beta_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 25.0, 50.0])
    alpha: float = 1.0  # used when there is no validation set with fusion_grid=alpha (Tip-Adapter's default)
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
        if self.fusion_grid not in ("spread", "alpha"):
            raise ConfigError(f"{self.method}: fusion_grid must be spread or alpha, got {self.fusion_grid!r}")


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
    """Weighted zero-shot logits plus the cache model's affinity-weighted one-hot labels.

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
        self.fusion: torch.Tensor
        self.register_buffer("class_embeds", torch.zeros(num_classes, dim))  # [C, D] zero-shot classifier
        keys = torch.zeros(num_keys, key_dim or dim)  # [N, D or F] normalised training features
        if train_keys:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.register_buffer("values", torch.zeros(num_keys, num_classes))  # [N, C] one-hot labels
        # current (w_zs, alpha, beta)
        self.register_buffer("fusion", torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))

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

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {image [B, D], pooled [B, F] (pooled keys)} -> fused logits [B, C] at the stored
        (w_zs, alpha, beta) (and the loss with targets)."""
        w_zs, alpha, beta = (float(v) for v in self.fusion)
        zs, aff = self.parts(batch)
        z = w_zs * zs + alpha * self.cache_logits(aff, beta)
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
    selects = "fusion weights, beta"
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

    def search(self, val: Encoded | None, train: Encoded | None) -> dict[str, Any]:
        """Choose (w_zs, alpha, beta) on validation (the selection rule; beta outer, the weights
        inner). The spread grid is scaled on `train`, the cache's own images, each left out of its
        own vote (its key would match it exactly); on `val`'s features when there is none (update)."""
        head = cast(CacheHead, self.head)  # built by _build
        c = self.config
        betas = list(dict.fromkeys([*c.beta_grid, c.beta]))
        scale = dict.fromkeys(betas, 1.0)  # beta -> spread(zero-shot) / spread(cache)
        on = train if train is not None else val
        if c.fusion_grid == "spread" and on is not None and len(on):
            with torch.no_grad():
                zs_t, aff_t = head.parts(on.features.batch(feature_keys(self.feature_needs()), 0, len(on)))
                if train is not None:
                    aff_t.fill_diagonal_(-math.inf)  # [N, N]: row i is key i's image
                scale = {b: spread_scale(zs_t, head.cache_logits(aff_t, b)) for b in betas}

        def weights(beta: float) -> list[tuple[float, float, float]]:
            if c.fusion_grid == "alpha":
                return [(1.0, a, beta) for a in c.alpha_grid]
            return [(*ratio_weights(r, scale[beta]), beta) for r in RATIOS]

        default = (
            (1.0, c.alpha, c.beta)
            if c.fusion_grid == "alpha"
            else (*ratio_weights(DEFAULT_RATIO, scale[c.beta]), c.beta)
        )
        if val is None or not len(val):
            head.fusion.copy_(torch.tensor(default, dtype=torch.float64))
            return {
                "zs_weight": default[0],
                "alpha": default[1],
                "beta": c.beta,
                "fusion_source": "default (no validation set)",
            }
        with torch.no_grad():
            zs, aff = head.parts(val.features.batch(feature_keys(self.feature_needs()), 0, len(val)))
        y = torch.as_tensor(val.dataset.labels())
        grid = [w for b in c.beta_grid for w in weights(b)]
        memo: dict[float, torch.Tensor] = {}  # the cache logits of the current beta (the grid is beta-major)

        def accuracy(w: tuple[float, float, float]) -> float:
            w_zs, alpha, beta = w
            if beta not in memo:
                memo.clear()
                memo[beta] = head.cache_logits(aff, beta)
            return float(((w_zs * zs + alpha * memo[beta]).argmax(-1) == y).float().mean())

        sel = select_best(grid, accuracy, default if default in grid else None)
        head.fusion.copy_(torch.tensor(sel.best, dtype=torch.float64))
        return {**sel.info("fusion"), "zs_weight": sel.best[0], "alpha": sel.best[1], "beta": sel.best[2]}

    def fit_head(self, train: Encoded, val: Encoded | None) -> None:
        self._build(train)
        self.fit_info = self.search(val, train)

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
            head.fusion.copy_(old.fusion)
        if val is not None:
            self.fit_info.update(self.search(self.encode(val), None))
        head.requires_grad_(False).eval()
        return f"{len(keys) - n_old} key(s) added to the cache" + (
            "; new keys are not fine-tuned (refit to fine-tune them)" if self.train_keys else ""
        )
