"""The figures `vlclassify eval --plots` writes for a fitted method and an evaluated split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .multilabel import alignment_matrix, roc_pr_curves, tsne_features


def write_eval_plots(method, dataset, probs: np.ndarray, folder: str | Path, title: str = "") -> list[Path]:
    """ROC/PR curves for every model; t-SNE of fused vs plain features and the token-image
    alignment matrix for models that expose them (`embeddings()`, `alignment()`: DiCLS)."""
    folder = Path(folder)
    y = dataset.multi_hot()
    paths = [roc_pr_curves(y, probs, method.classnames, folder / "roc_pr.png", title)]
    if hasattr(method, "embeddings"):
        e = method.embeddings(dataset)
        paths.append(tsne_features(e["plain"], e["fused"], y, method.classnames, folder / "tsne.png", title=title))
    if hasattr(method, "alignment") and getattr(method.config, "w_aln", 0) > 0:
        a = method.alignment(dataset)
        paths.append(alignment_matrix(a["truth"], a["pred"], a["tokens"], folder / "alignment.png", title=title))
    return paths
