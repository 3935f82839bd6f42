"""Metrics: `score` (the headline numbers, one function), single-label and multi-label reports, ranking,
calibration and open-set metrics."""

from .calibration import brier, calibration_report, ece, nll
from .classification import classification_report
from .headline import score
from .multilabel import best_threshold, mean_average_precision, multilabel_report
from .openset import auroc, fpr_at_tpr, keep_threshold
from .ranking import recall_at_precision

__all__ = [
    "auroc",
    "best_threshold",
    "brier",
    "calibration_report",
    "classification_report",
    "ece",
    "fpr_at_tpr",
    "keep_threshold",
    "mean_average_precision",
    "multilabel_report",
    "nll",
    "recall_at_precision",
    "score",
]
