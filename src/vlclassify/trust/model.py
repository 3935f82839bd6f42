"""What a fitted model knows about its own scores, saved with it: one calibration per task, the
open-set rule, and the class means / shared covariance of its training features.

    trust = fit_trust(val_logits, val_targets, activations, ...)   # Method.fit, after the head
    trust.scores(logits, task)                                    # what predict_proba returns
    trust.open_set_scores(logits, features)                       # {score: [N]} per image
    cfg["calibration"], cfg["open_set"] = trust.config()          # config.json
    trust.tensors()                                               # model.safetensors ("openset.*")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..metrics.openset import KEEP
from .calibration import Calibration, fit_calibration, identity
from .openset import FeatureStats, OpenSetRule, choose_open_set, open_set_scores

OPEN_SET_FEATURES = ("pooled", "image")  # the feature the class means are of: the first one the method reads


@dataclass
class Trust:
    """Calibration per task, the open-set rule and the feature statistics it may read."""

    calibrations: dict[str, Calibration] = field(default_factory=dict)  # task -> calibration
    open_set: OpenSetRule = field(default_factory=OpenSetRule)
    stats: FeatureStats | None = None  # class means / shared precision of the training features
    feature: str | None = None  # which features `stats` are of (pooled | image); None: no feature score

    def calibration(self, task: str, activation: str) -> Calibration:
        """The task's calibration (the raw `activation` for a model saved before it had one)."""
        return self.calibrations.get(task) or identity(activation)

    def open_set_scores(
        self, logits: torch.Tensor, main: Calibration, features: torch.Tensor | None
    ) -> dict[str, np.ndarray]:
        """{score: [N]} for the main task's raw logits [N, C] and the images' features [N, D]."""
        return open_set_scores(logits, main, features if self.stats is not None else None, self.stats)

    def config(self) -> dict[str, Any]:
        """config.json's "calibration" {task: ...}, "open_set" {... , "feature"}."""
        return {
            "calibration": {t: c.to_dict() for t, c in self.calibrations.items()},
            "open_set": {**self.open_set.to_dict(), "feature": self.feature},
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any], task_classes: dict[str, list[str]], where: str) -> Trust:
        """Read back `config()` (a model saved without them: raw scores, no "unknown")."""
        cals = cfg.get("calibration") or {}
        if not isinstance(cals, dict):
            raise ConfigError(f"{where}: 'calibration' must be an object of task -> calibration")
        unknown = sorted(set(cals) - set(task_classes))
        if unknown:
            raise ConfigError(f"{where}: calibration for unknown task(s) {', '.join(unknown)}")
        calibrations = {
            t: Calibration.from_dict(d, len(task_classes[t]), f"{where}: calibration[{t!r}]") for t, d in cals.items()
        }
        rule = dict(cfg.get("open_set") or {})
        feature = rule.pop("feature", None)
        if feature is not None and feature not in OPEN_SET_FEATURES:
            raise ConfigError(
                f"{where}: open_set.feature must be one of {', '.join(OPEN_SET_FEATURES)}, got {feature!r}"
            )
        return cls(calibrations, OpenSetRule.from_dict(rule, f"{where}: open_set"), None, feature)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What model.safetensors holds of it: the feature statistics, if any."""
        return self.stats.tensors() if self.stats is not None else {}

    def load_tensors(self, tensors: dict[str, torch.Tensor], num_classes: int, where: str) -> None:
        """Read the feature statistics back; a rule that needs them and finds none is an error naming `where`."""
        self.stats = FeatureStats.from_tensors(tensors, where)
        if self.stats is not None and self.stats.means.shape[0] != num_classes:
            raise ConfigError(f"{where}: openset.means has {self.stats.means.shape[0]} rows for {num_classes} classes")
        if self.open_set.score in ("cosine", "mahalanobis") and (self.stats is None or self.feature is None):
            raise ConfigError(f"{where}: the open-set score {self.open_set.score!r} needs openset.* tensors, missing")


def open_set_feature(needs: frozenset[str]) -> str | None:
    """The feature a method's class means are of: pooled if it reads it, else the joint image embedding."""
    return next((k for k in OPEN_SET_FEATURES if k in needs), None)


def fit_trust(
    num_classes: int,
    val_logits: dict[str, torch.Tensor] | None,
    val_targets: dict[str, np.ndarray] | None,
    activations: dict[str, str],
    train_features: torch.Tensor | None = None,
    train_targets: np.ndarray | None = None,
    val_features: torch.Tensor | None = None,
    feature: str | None = None,
    keep: float = KEEP,
    calibrated: bool = False,
) -> Trust:
    """Calibrate every task on its validation logits and targets (`activations`: task -> softmax |
    sigmoid, the main task first, of `num_classes` classes), then choose the open-set rule on the
    calibrated main task.

    calibrated: the method's scores are calibrated on validation by its own fit (T stays 1).
    train_features [N, D] / train_targets: what the class means and covariance are of (None: no
    feature score). Without validation data every calibration is the identity and "unknown" is off.
    """
    tasks = list(activations)
    cals: dict[str, Calibration] = {}
    for task in tasks:
        act = activations[task]
        if calibrated:
            cals[task] = identity(act, "method", "the method calibrates its scores on validation itself: T = 1")
        elif not val_logits or task not in val_logits or val_targets is None:
            cals[task] = identity(act, note="no validation set: raw scores (T = 1)")
        else:
            cals[task] = fit_calibration(val_logits[task], val_targets[task], act)
    main = tasks[0]
    stats = None
    if train_features is not None and train_targets is not None and feature is not None:
        stats = FeatureStats.fit(train_features, train_targets, num_classes)
    rule = choose_open_set(
        val_logits.get(main) if val_logits else None,
        val_targets.get(main) if val_targets else None,
        cals[main],
        val_features if stats is not None else None,
        stats,
        keep,
    )
    return Trust(cals, rule, stats, feature if stats is not None else None)
