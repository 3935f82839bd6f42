"""Scores a user can trust: calibration chosen on validation, and "unknown" for images of no known class."""

from .calibration import Calibration, fit_calibration, fit_platt, fit_temperature, identity
from .openset import (
    SCORES,
    FeatureStats,
    OpenSetRule,
    choose_open_set,
    heldout_class_auroc,
    open_set_scores,
    score_tensors,
)

__all__ = [
    "SCORES",
    "Calibration",
    "FeatureStats",
    "OpenSetRule",
    "choose_open_set",
    "fit_calibration",
    "fit_platt",
    "fit_temperature",
    "heldout_class_auroc",
    "identity",
    "open_set_scores",
    "score_tensors",
]
