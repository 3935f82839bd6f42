"""Linear probe: logistic regression on frozen, L2-normalised features; C chosen on validation.

Single-label data: multinomial logistic regression, C chosen by validation accuracy.
Multi-label data: one-vs-rest logistic regressions, C chosen by validation mean average precision.
C is chosen with the package's one selection rule (training/selection.py: the best validation
score, ties to the C nearest the one used without validation data, the middle of the grid).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..training import select_best
from .base import MULTI, SINGLE, TEXT, Encoded, Method, check_dim, normalize
from .registry import register_method

FEATURES = ("pooled", "image", "text")


@dataclass
class LinearProbeConfig:
    # pooled (raw visual features) | image (joint-space embedding) | text (paired-text embedding)
    feature: str = "pooled"
    C_grid: list[float] = field(
        default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    )  # inverse L2 strengths tried
    max_iter: int = 1000  # L-BFGS iterations


class LinearHead(nn.Module):
    """batch {feature: [B, F]} -> {"logits": normalise(x) W^T + b [B, C]}."""

    def __init__(self, feature: str, num_classes: int, dim: int) -> None:
        super().__init__()
        self.feature = feature
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))  # [C, F]
        self.bias = nn.Parameter(torch.zeros(num_classes))  # [C]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch[self.feature]
        check_dim(x, self.weight.shape[1], "linear-probe")
        return {"logits": normalize(x) @ self.weight.T + self.bias}


@register_method
class LinearProbe(Method):
    """Logistic regression on L2-normalised frozen features (one-vs-rest for multi-label); C on validation."""

    name = "linear-probe"
    Config = LinearProbeConfig
    kinds = frozenset({SINGLE, MULTI})
    optional_kinds = frozenset({TEXT})  # feature="text": a probe on the paired texts' embeddings
    selects = "C (regularisation)"
    needs = frozenset({"pooled"})

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        if self.config.feature not in FEATURES:
            raise ConfigError(
                f"linear-probe: feature must be one of {', '.join(FEATURES)}, got {self.config.feature!r}"
            )
        if not self.config.C_grid or min(self.config.C_grid) <= 0:
            raise ConfigError(f"linear-probe: C_grid must be non-empty and > 0, got {self.config.C_grid}")

    def takes(self) -> frozenset[str]:
        return self.kinds | ({TEXT} if self.config.feature == "text" else set())

    def feature_needs(self) -> frozenset[str]:
        return frozenset({self.config.feature})

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        return LinearHead(self.config.feature, spec["num_classes"], spec["dim"])

    def _x(self, data: Encoded) -> np.ndarray:
        return normalize(data.features.tensor(self.config.feature)).numpy()

    def _targets(self, data: Encoded) -> np.ndarray:
        return data.dataset.multi_hot() if self.multilabel else data.dataset.labels()

    def _train(self, x: np.ndarray, y: np.ndarray, C: float, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (W [C, F], b [C]); classes absent from training (or, one-vs-rest, never negative) are constant."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        w = np.zeros((n_classes, x.shape[1]), dtype=np.float32)
        b = np.full(n_classes, -1e4, dtype=np.float32)  # never predicted
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.multilabel:
                for c in range(n_classes):
                    yc = y[:, c]
                    if yc.min() == yc.max():
                        b[c] = 1e4 if yc[0] else -1e4
                        continue
                    clf = LogisticRegression(C=C, max_iter=self.config.max_iter).fit(x, yc)
                    w[c], b[c] = clf.coef_[0], clf.intercept_[0]
                return w, b
            clf = LogisticRegression(C=C, max_iter=self.config.max_iter).fit(x, y)
        if len(clf.classes_) == 2:  # sklearn stores one row for binary problems
            rows = np.stack([-clf.coef_[0], clf.coef_[0]]) / 2
            inter = np.array([-clf.intercept_[0], clf.intercept_[0]]) / 2
        else:
            rows, inter = clf.coef_, clf.intercept_
        w[clf.classes_] = rows
        b[clf.classes_] = inter
        return w, b

    def _score(self, w: np.ndarray, b: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> float:
        z = xv @ w.T + b
        if self.multilabel:
            from ..metrics import mean_average_precision

            return mean_average_precision(yv, z)
        return float((z.argmax(-1) == yv).mean())

    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        x, y = self._x(train), self._targets(train)
        n = len(self.classnames)
        grid = sorted(self.config.C_grid)
        if val is not None and len(grid) > 1:
            xv, yv = self._x(val), self._targets(val)
            fits: dict[float, tuple[np.ndarray, np.ndarray]] = {}

            def evaluate(C: float) -> float:
                fits[C] = self._train(x, y, C, n)
                return self._score(*fits[C], xv, yv)

            sel = select_best(grid, evaluate, default=grid[len(grid) // 2])  # the C used without validation
            w, b = fits[sel.best]
            self.fit_info = {
                **sel.info("C"),
                "val_score_by_C": dict(zip(map(str, grid), sel.scores)),
                "val_metric": "mAP" if self.multilabel else "accuracy",
            }
        else:
            C = grid[len(grid) // 2]
            w, b = self._train(x, y, C, n)
            self.fit_info = {"C": C, "C_source": "middle of the grid (no validation set)"}
        head = self.init_head({"num_classes": n, "dim": x.shape[1]})
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(w))
            head.bias.copy_(torch.from_numpy(b))
