"""Metrics: single-label classification here; multi-label and ranking metrics beside it."""

from .classification import accuracy, classification_report
from .multilabel import best_threshold, mean_average_precision, multilabel_report
from .ranking import recall_at_precision

__all__ = [
    "accuracy",
    "best_threshold",
    "classification_report",
    "mean_average_precision",
    "multilabel_report",
    "recall_at_precision",
]
