"""Metrics: single-label classification here; multi-label and ranking metrics beside it."""
from .classification import accuracy, classification_report

__all__ = ["accuracy", "classification_report"]
