"""Figures as PNG files (matplotlib, Agg backend: no display needed): the one home of plotting."""

from .heatmap import heatmap_overlay, save_heatmap
from .multilabel import alignment_matrix, roc_pr_curves, tsne_features
from .reliability import reliability_diagram
from .report import TaskScores, write_eval_plots

__all__ = [
    "alignment_matrix",
    "roc_pr_curves",
    "tsne_features",
    "heatmap_overlay",
    "save_heatmap",
    "reliability_diagram",
    "TaskScores",
    "write_eval_plots",
]
