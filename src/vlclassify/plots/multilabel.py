"""The DiCLS paper's figures: per-class ROC and PR curves (Fig. 4), t-SNE of fused vs plain
features (Fig. 5), and the token-image alignment matrix, ground truth vs prediction (Fig. 6)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..utils import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return [cmap(i % cmap.N) for i in range(n)]


def roc_pr_curves(
    y_true: np.ndarray, probs: np.ndarray, classnames: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """y_true [N, C] 0/1, probs [N, C] -> one PNG: ROC (left) and precision-recall (right), a curve per class."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    for c, (name, col) in enumerate(zip(classnames, _colors(len(classnames)))):
        y, p = y_true[:, c], probs[:, c]
        if not 0 < y.sum() < len(y):
            continue  # no curve without positives and negatives
        fpr, tpr, _ = roc_curve(y, p)
        ax1.plot(fpr, tpr, color=col, lw=1.3, label=f"{name} ({roc_auc_score(y, p):.3f})")
        prec, rec, _ = precision_recall_curve(y, p)
        ax2.plot(rec, prec, color=col, lw=1.3, label=f"{name} ({average_precision_score(y, p):.3f})")
    ax1.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (AUC)", xlim=(0, 1), ylim=(0, 1.01))
    ax2.set(xlabel="recall", ylabel="precision", title="precision-recall (AP)", xlim=(0, 1), ylim=(0, 1.01))
    for ax in (ax1, ax2):
        ax.legend(fontsize=7, loc="lower right" if ax is ax1 else "lower left", ncol=1 + len(classnames) // 11)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _color_labels(y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Points to show and the class that colours each: single-label items if there are enough,
    else every item coloured by its first label."""
    single = y_true.sum(1) == 1
    if single.sum() >= max(30, 0.2 * len(y_true)):
        idx = np.flatnonzero(single)
        return idx, y_true[idx].argmax(1), "single-label items"
    idx = np.flatnonzero(y_true.sum(1) > 0)
    return idx, y_true[idx].argmax(1), "coloured by first label"


def tsne_features(
    plain: np.ndarray,
    fused: np.ndarray,
    y_true: np.ndarray,
    classnames: Sequence[str],
    path: str | Path,
    seed: int = 0,
    max_points: int = 600,
    title: str = "",
) -> Path:
    """plain [N, F] backbone features, fused [N, d] fused features, y_true [N, C] -> side-by-side t-SNE."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    plt = _plt()
    idx, lab, how = _color_labels(np.asarray(y_true))
    if len(idx) > max_points:
        idx, lab = idx[:max_points], lab[:max_points]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    cols = _colors(len(classnames))
    for ax, x, name in ((axes[0], fused, "fused (DiCLS)"), (axes[1], plain, "plain backbone")):
        x = np.asarray(x, dtype=np.float64)[idx]
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        with threadpool_limits(1):  # OpenMP threads spin for seconds per call on a busy machine
            z = (
                TSNE(
                    n_components=2,
                    perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)),
                    init="pca",
                    random_state=seed,
                    max_iter=750,
                ).fit_transform(x)
                if len(x) > 3
                else np.zeros((len(x), 2))
            )
        for c in np.unique(lab):
            sel = lab == c
            ax.scatter(z[sel, 0], z[sel, 1], s=9, color=cols[c], label=classnames[c], alpha=0.8)
        ax.set_title(f"{name}, {len(x)} points ({how})")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, markerscale=1.5, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def alignment_matrix(
    truth: np.ndarray, pred: np.ndarray, tokens: Sequence[str], path: str | Path, rows: int = 16, title: str = ""
) -> Path:
    """truth / pred [N, L] (target mask M and predicted S_align) for the first `rows` images -> two heatmaps."""
    plt = _plt()
    truth, pred = np.asarray(truth)[:rows], np.asarray(pred)[:rows]
    L = truth.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.55 * L), 0.38 * len(truth) + 2.5))
    for ax, m, name in ((axes[0], truth, "ground truth M"), (axes[1], pred, "prediction S_align")):
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(L))
        ax.set_xticklabels(tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(m)))
        ax.set_yticklabels([f"img {i}" for i in range(len(m))], fontsize=7)
        ax.set_title(name)
    fig.colorbar(im, ax=axes, fraction=0.02)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
