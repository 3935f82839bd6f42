"""The figures `vlclassify eval --plots` writes for a fitted method and an evaluated split."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .multilabel import alignment_matrix, roc_pr_curves, tsne_features


@dataclass(frozen=True)
class TaskScores:
    """One task's labels and scores, for its own ROC/PR figure."""

    classnames: Sequence[str]  # the model's classes for this task, in the column order of `probs`
    y_true: np.ndarray  # [N] index into `classnames` (-1 = no label), or [N, C] 0/1
    probs: np.ndarray  # [N, C] scores

    def multi_hot(self) -> tuple[np.ndarray, np.ndarray]:
        """([M, C] 0/1 targets, [M, C] scores) of the labelled items."""
        y, p = np.asarray(self.y_true), np.asarray(self.probs)
        if y.ndim == 2:
            keep = y.sum(1) > 0
            return y[keep], p[keep]
        keep = y >= 0
        return np.eye(len(self.classnames), dtype=np.float32)[y[keep]], p[keep]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "task"


def write_eval_plots(
    method,
    dataset,
    probs: np.ndarray | None,
    folder: str | Path,
    title: str = "",
    tasks: Mapping[str, TaskScores] | None = None,
) -> list[Path]:
    """ROC/PR curves for every model; t-SNE of fused vs plain features and the token-image
    alignment matrix for models that declare them (`tags.figures`: DiCLS).

    Without `tasks`: `roc_pr.png` from `probs` [N, C] against `dataset.multi_hot()`. With `tasks`
    (multi-task models, e.g. cma-clip; the main task is one of them): `roc_pr-<task>.png` per task,
    its name in the title, and `probs` is not used.
    """
    folder = Path(folder)
    y = dataset.multi_hot()
    if tasks:
        paths = []
        for name, ts in tasks.items():
            yt, pt = ts.multi_hot()
            t_title = f"{title} · task {name}" if title else f"task {name}"
            paths.append(roc_pr_curves(yt, pt, ts.classnames, folder / f"roc_pr-{_slug(name)}.png", t_title))
    else:
        assert probs is not None, "without tasks, `probs` are the scores plotted"
        paths = [roc_pr_curves(y, probs, method.classnames, folder / "roc_pr.png", title)]
    figures = type(method).tags.figures
    if "tsne" in figures:
        e = method.embeddings(dataset)
        paths.append(tsne_features(e["plain"], e["fused"], y, method.classnames, folder / "tsne.png", title=title))
    if "alignment" in figures and getattr(method.config, "w_aln", 0) > 0:
        a = method.alignment(dataset)
        paths.append(alignment_matrix(a["truth"], a["pred"], a["tokens"], folder / "alignment.png", title=title))
    return paths
