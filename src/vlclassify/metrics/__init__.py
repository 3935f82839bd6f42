"""Metrics: single-label classification here; multi-label, ranking, calibration and open-set metrics beside it."""

from .calibration import brier, calibration_report, ece, nll
from .classification import accuracy, classification_report
from .multilabel import best_threshold, mean_average_precision, multilabel_report
from .openset import auroc, fpr_at_tpr, keep_threshold
from .ranking import recall_at_precision

__all__ = [
    "accuracy",
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
]
