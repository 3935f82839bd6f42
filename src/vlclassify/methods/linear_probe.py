"""Linear probe: logistic regression on frozen features, regularisation chosen on validation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError
from .base import Encoded, Method, normalize
from .registry import register_method


@dataclass
class LinearProbeConfig:
    feature: str = "pooled"  # pooled (raw visual features) | image (joint-space embedding)
    C_grid: list[float] = field(
        default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    )  # inverse L2 strengths tried
    max_iter: int = 1000  # L-BFGS iterations


@register_method
class LinearProbe(Method):
    """Logistic regression on L2-normalised frozen features; C chosen on the validation set."""

    name = "linear-probe"
    Config = LinearProbeConfig

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        if self.config.feature not in ("pooled", "image"):
            raise ConfigError(f"linear-probe: feature must be pooled or image, got {self.config.feature!r}")
        self.weight: torch.Tensor | None = None  # [C, F]
        self.bias: torch.Tensor | None = None  # [C]

    def _x(self, data: Encoded) -> np.ndarray:
        return normalize(getattr(data.features, self.config.feature)).numpy()

    def _train(self, x: np.ndarray, y: np.ndarray, C: float, n_classes: int):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=C, max_iter=self.config.max_iter)
            clf.fit(x, y)
        w = np.zeros((n_classes, x.shape[1]), dtype=np.float32)
        b = np.full(n_classes, -1e4, dtype=np.float32)  # classes absent from training are never predicted
        if len(clf.classes_) == 2:  # sklearn stores one row for binary problems
            rows = np.stack([-clf.coef_[0], clf.coef_[0]]) / 2
            inter = np.array([-clf.intercept_[0], clf.intercept_[0]]) / 2
        else:
            rows, inter = clf.coef_, clf.intercept_
        w[clf.classes_] = rows
        b[clf.classes_] = inter
        return torch.from_numpy(w), torch.from_numpy(b)

    def _fit(self, train: Encoded, val: Encoded | None) -> None:
        x, y = self._x(train), train.dataset.labels()
        C_n = train.dataset.num_classes
        grid = list(self.config.C_grid)
        scores = {}
        if val is not None and len(grid) > 1:
            xv, yv = self._x(val), val.dataset.labels()
            nll = {}
            for C in grid:
                w, b = self._train(x, y, C, C_n)
                z = torch.from_numpy(xv) @ w.T + b
                scores[C] = float((z.argmax(-1).numpy() == yv).mean())
                nll[C] = float(torch.nn.functional.cross_entropy(z, torch.from_numpy(yv)))
            # accuracy first; on a tie (common with 4 images per class) the better-calibrated C
            best = max(grid, key=lambda c: (scores[c], -nll[c]))
        else:
            best = grid[len(grid) // 2]
        self.weight, self.bias = self._train(x, y, best, C_n)
        self.fit_info = {"C": best, "val_accuracy_by_C": scores}

    def _logits(self, data: Encoded) -> torch.Tensor:
        x = torch.from_numpy(self._x(data))
        if x.shape[1] != self.weight.shape[1]:
            raise ConfigError(
                f"linear-probe: features are {x.shape[1]}-d but the saved head expects {self.weight.shape[1]}-d"
            )
        return x @ self.weight.T + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def load_tensors(self, tensors) -> None:
        self.weight, self.bias = tensors["weight"], tensors["bias"]
