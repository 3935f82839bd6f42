"""Figures as PNG files (matplotlib, Agg backend: no display needed)."""

from .multilabel import alignment_matrix, roc_pr_curves, tsne_features

__all__ = ["alignment_matrix", "roc_pr_curves", "tsne_features"]
