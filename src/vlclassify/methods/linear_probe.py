"""Linear probe: logistic regression on frozen, L2-normalised features; C chosen on validation.

Single-label data: multinomial logistic regression, C chosen by validation accuracy.
Multi-label data: one-vs-rest logistic regressions, C chosen by validation mean average precision.
C is chosen with the package's one selection rule (training/selection.py: the best validation
score, ties to the C nearest the one used without validation data, the middle of the grid). The
solver is training/logistic.py: scikit-learn's objective by full-batch L-BFGS in torch, the whole
C path warm-started from one C to the next (docs/results/linear-probe-solver.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..training import select_best
from ..training.logistic import fit_logistic, fit_logistic_path
from .base import MULTI, SINGLE, TEXT, Encoded, Method, check_dim, normalize
from .registry import register_method
from .tags import Tags

FEATURES = ("pooled", "image", "text")


@dataclass(frozen=True)
class LinearProbeConfig:
    """Linear-probe options: the feature probed, the C grid and the solver."""

    # pooled (raw visual features) | image (joint-space embedding) | text (paired-text embedding)
    feature: str = "pooled"
    C_grid: list[float] = field(
        default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    )  # inverse L2 strengths tried
    max_iter: int = 1000  # L-BFGS iterations per C (training/logistic.py: full batch, warm-started along the grid)

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ConfigError(f"linear-probe: feature must be one of {', '.join(FEATURES)}, got {self.feature!r}")
        if not self.C_grid or min(self.C_grid) <= 0:
            raise ConfigError(f"linear-probe: C_grid must be non-empty and > 0, got {self.C_grid}")


class LinearHead(nn.Module):
    """batch {feature: [B, F]} -> {"logits": normalise(x) W^T + b [B, C]}."""

    def __init__(self, feature: str, num_classes: int, dim: int) -> None:
        super().__init__()
        self.feature = feature
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))  # [C, F]
        self.bias = nn.Parameter(torch.zeros(num_classes))  # [C]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {feature [B, F]} -> logits [B, C] of the normalised feature."""
        x = batch[self.feature]
        check_dim(x, self.weight.shape[1], "linear-probe")
        return {"logits": normalize(x) @ self.weight.T + self.bias}


@register_method
class LinearProbe(Method):
    """Logistic regression on L2-normalised frozen features (one-vs-rest for multi-label); C on validation."""

    name = "linear-probe"
    tags = Tags(update=True, onnx=True)
    Config = LinearProbeConfig
    kinds = frozenset({SINGLE, MULTI})
    optional_kinds = frozenset({TEXT})  # feature="text": a probe on the paired texts' embeddings
    selects = "C (regularisation)"
    needs = frozenset({"pooled"})

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

    def _score(self, w: np.ndarray, b: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> float:
        from ..metrics import score

        kind, key = (MULTI, "mAP") if self.multilabel else (SINGLE, "accuracy")
        return score(kind, yv, xv @ w.T + b)[key]

    def fit_head(self, train: Encoded, val: Encoded | None) -> None:
        x, y = self._x(train), self._targets(train)
        n, c = len(self.classnames), self.config
        grid = sorted(c.C_grid)
        if val is not None and len(grid) > 1:
            xv, yv = self._x(val), self._targets(val)
            path = fit_logistic_path(x, y, grid, multilabel=self.multilabel, num_classes=n, max_iter=c.max_iter)
            fits = dict(zip(grid, path))
            sel = select_best(
                grid,
                lambda C: self._score(fits[C][0].numpy(), fits[C][1].numpy(), xv, yv),
                default=grid[len(grid) // 2],
            )  # the C used without validation
            w, b = fits[sel.best]
            self.fit_info = {
                **sel.info("C"),
                "val_score_by_C": dict(zip(map(str, grid), sel.scores)),
                "val_metric": "mAP" if self.multilabel else "accuracy",
            }
        else:
            C = grid[len(grid) // 2]
            w, b = fit_logistic(x, y, C, multilabel=self.multilabel, num_classes=n, max_iter=c.max_iter)
            self.fit_info = {"C": C, "C_source": "middle of the grid (no validation set)"}
        head = cast(LinearHead, self.init_head({"num_classes": n, "dim": x.shape[1]}))
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)

    def _update(self, train, val, classes, descriptions):
        """A warm start from the fitted weights (new classes start at zero), at the C chosen before.
        The objective is convex, so the result is the fit on the new data; the start only saves
        iterations. It needs examples of every class, like a refit."""
        if train is None or (not train.multilabel and set(range(len(classes))) - set(train.labels().tolist())):
            return None  # classes without examples: the update refits, which names them
        old, c_old = cast(LinearHead, self.head), len(self.classnames)
        self.classnames, self.task_classes = list(classes), {"label": list(classes)}
        enc = self.encode(train, training=True)
        x, y = self._x(enc), self._targets(enc)
        w0 = torch.cat([old.weight.detach(), old.weight.new_zeros(len(classes) - c_old, old.weight.shape[1])])
        b0 = torch.cat([old.bias.detach(), old.bias.new_zeros(len(classes) - c_old)])
        C = float(self.fit_info.get("C", sorted(self.config.C_grid)[len(self.config.C_grid) // 2]))
        w, b = fit_logistic(
            x, y, C, multilabel=self.multilabel, num_classes=len(classes), init=(w0, b0), max_iter=self.config.max_iter
        )
        head = cast(LinearHead, self.init_head({"num_classes": len(classes), "dim": x.shape[1]}))
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        head.requires_grad_(False).eval()
        return f"warm start from the fitted weights at C={C:g} on {len(train)} example(s)"
