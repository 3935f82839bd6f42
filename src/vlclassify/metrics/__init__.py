"""Metrics: `score` (the headline numbers, one function), single-label and multi-label reports, ranking."""

from .classification import classification_report
from .headline import score
from .multilabel import best_threshold, mean_average_precision, multilabel_report
from .ranking import recall_at_precision

__all__ = [
    "best_threshold",
    "classification_report",
    "mean_average_precision",
    "multilabel_report",
    "recall_at_precision",
    "score",
]
