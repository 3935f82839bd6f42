"""The DiCLS paper's figures: per-class ROC and PR curves (Fig. 4), t-SNE of fused vs plain
features (Fig. 5), and the token-image alignment matrix, ground truth vs prediction (Fig. 6).

Readable with many classes: only the `max_classes` classes with the most positives get a colour
and a legend entry (the legend sits outside the axes), the others are drawn in grey, and a note
under the figure says so.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..utils import atomic_path

MAX_CLASSES = 10  # classes that get a colour and a legend entry (tab10: ten distinct colours)
GREY = (0.6, 0.6, 0.6, 1.0)


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
    """n distinct colours, none of them grey (grey marks the classes left out)."""
    if n <= 10:
        tab = _plt().get_cmap("tab10")
        palette = [tab(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + [(0.0, 0.0, 0.0, 1.0)]
    else:
        tab = _plt().get_cmap("tab20")
        palette = [tab(i) for i in range(20) if i not in (14, 15)]
    return [palette[i % len(palette)] for i in range(n)]


def _note(fig, text: str) -> None:
    """A caption under the axes (kept inside the saved PNG by bbox_inches='tight')."""
    fig.text(0.01, -0.01, textwrap.fill(text, 160), ha="left", va="top", fontsize=8.5, wrap=False)


def top_classes(y_true: np.ndarray, max_classes: int = MAX_CLASSES) -> np.ndarray:
    """Indices of the classes with the most positives (ties: lower index first), at most `max_classes`."""
    support = np.asarray(y_true).sum(0)
    order = np.lexsort((np.arange(len(support)), -support))
    return order[: min(max_classes, int((support > 0).sum()))]


def _roc_pr_figure(y_true, probs, classnames, title: str = "", max_classes: int = MAX_CLASSES):
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = _plt()
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    scored = [c for c in range(len(classnames)) if 0 < y_true[:, c].sum() < len(y_true)]
    top = [c for c in top_classes(y_true, max_classes) if c in scored]
    cols = dict(zip(top, _colors(len(top))))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.2))
    aucs, aps = {}, {}
    for c in sorted(scored, key=lambda c: c in cols):  # grey curves first, coloured ones on top
        y, p = y_true[:, c], probs[:, c]
        aucs[c], aps[c] = roc_auc_score(y, p), average_precision_score(y, p)
        fpr, tpr, _ = roc_curve(y, p)
        prec, rec, _ = precision_recall_curve(y, p)
        style = (
            {"color": cols[c], "lw": 1.5, "label": f"{classnames[c]} (n={int(y.sum())}): {aucs[c]:.3f} / {aps[c]:.3f}"}
            if c in cols
            else {"color": GREY, "lw": 0.7, "alpha": 0.5}
        )
        ax1.plot(fpr, tpr, **style)
        ax2.plot(rec, prec, **style)
    ax1.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax2.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if top:
        ax2.legend(
            title="class (positives): AUC / AP",
            fontsize=8,
            title_fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.02, 1),
        )
    n_unscored = len(classnames) - len(scored)
    note = f"{len(scored)} of {len(classnames)} classes scored"
    if n_unscored:
        note += f" ({n_unscored} have no positives or no negatives here)"
    if aucs:
        note += f"; macro AUC {np.mean(list(aucs.values())):.3f}, macro AP {np.mean(list(aps.values())):.3f}"
    note += "."
    if len(scored) > len(top):
        note += f" Coloured: the {len(top)} classes with the most positives; grey: the other {len(scored) - len(top)}."
    _note(fig, note)
    if title:
        fig.suptitle(title)
    return fig


def roc_pr_curves(
    y_true: np.ndarray,
    probs: np.ndarray,
    classnames: Sequence[str],
    path: str | Path,
    title: str = "",
    max_classes: int = MAX_CLASSES,
) -> Path:
    """y_true [N, C] 0/1, probs [N, C] -> one PNG: ROC (left) and precision-recall (right), a curve per class."""
    return _save(_roc_pr_figure(y_true, probs, classnames, title, max_classes), path)


def _colour_by(y_true: np.ndarray, top: np.ndarray) -> np.ndarray:
    """[N] the colour class of each item: its rarest label among `top` (the most telling one: with
    a frequent class, colouring by the most frequent label paints nearly every point alike), -1 if none."""
    rank = np.full(y_true.shape[1], -1)
    rank[top] = np.arange(len(top))
    r = np.where(y_true > 0, rank[None, :], -1).max(1)
    return np.where(r >= 0, top[np.maximum(r, 0)] if len(top) else -1, -1)


def _tsne_figure(plain, fused, y_true, classnames, seed: int, max_points: int, title: str, max_classes: int):
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    plt = _plt()
    y_true = np.asarray(y_true)
    idx = np.flatnonzero(y_true.sum(1) > 0)
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_points, replace=False))
    y = y_true[idx]
    top = top_classes(y, max_classes)
    colour = _colour_by(y, top)
    n_labels = y.sum(1).astype(int)
    multilabel = bool((n_labels > 1).any())
    markers = {1: ("o", "1 label"), 2: ("^", "2 labels"), 3: ("s", "3 or more")}
    cols = dict(zip(top.tolist(), _colors(len(top))))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.8))
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
        for k, (marker, _) in markers.items():
            for c in [-1] + top.tolist():  # grey first, below the coloured points
                sel = (colour == c) & (np.minimum(n_labels, 3) == k)
                if sel.any():
                    ax.scatter(z[sel, 0], z[sel, 1], s=12, marker=marker, color=cols.get(c, GREY), alpha=0.8, lw=0)
        ax.set_title(f"{name}, {len(x)} images")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], ls="", marker="o", color=cols[c], label=classnames[c]) for c in top.tolist()]
    if (colour == -1).any():
        handles.append(plt.Line2D([], [], ls="", marker="o", color=GREY, label="other classes"))
    if multilabel:
        handles += [plt.Line2D([], [], ls="", marker=m, color="k", label=lab) for m, lab in markers.values()]
    axes[1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    n_rest = int((y.sum(0) > 0).sum()) - len(top)
    if multilabel:
        note = (
            f"Each point is one image. Colour: the image's rarest label among the {len(top)} most frequent classes"
            + (f"; grey: an image whose labels are all among the other {n_rest}" if n_rest > 0 else "")
            + ". Marker: how many labels the image has (circle 1, triangle 2, square 3 or more)."
        )
    else:
        note = f"Each point is one image, coloured by its label: the {len(top)} most frequent classes" + (
            f"; grey: the other {n_rest}." if n_rest > 0 else "."
        )
    _note(fig, note)
    if title:
        fig.suptitle(title)
    return fig


def tsne_features(
    plain: np.ndarray,
    fused: np.ndarray,
    y_true: np.ndarray,
    classnames: Sequence[str],
    path: str | Path,
    seed: int = 0,
    max_points: int = 600,
    title: str = "",
    max_classes: int = MAX_CLASSES,
) -> Path:
    """plain [N, F] backbone features, fused [N, d] fused features, y_true [N, C] -> side-by-side t-SNE
    of up to `max_points` labelled images (a seeded random sample); the caption explains the colours."""
    return _save(_tsne_figure(plain, fused, y_true, classnames, seed, max_points, title, max_classes), path)


CELL_W, CELL_H, CHAR_H = 0.2, 0.24, 0.075  # inches per token column, per image row, per character of a label


def _alignment_figure(truth, pred, tokens, rows: int, title: str):
    plt = _plt()
    truth, pred = np.asarray(truth)[:rows], np.asarray(pred)[:rows]
    n, L = truth.shape
    tick_h = CHAR_H * max((len(t) for t in tokens), default=1) + 0.3  # rotated token labels under each panel
    panel_h = CELL_H * n + tick_h + 0.45
    fig, axes = plt.subplots(
        2, 1, figsize=(max(4.0, CELL_W * L + 1.8), 2 * panel_h + (0.4 if title else 0)), constrained_layout=True
    )
    for ax, m, name in ((axes[0], truth, "ground truth M"), (axes[1], pred, "prediction S_align")):
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(L))
        ax.set_xticklabels(tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"img {i}" for i in range(n)], fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes, fraction=0.03 if L > 30 else 0.06, pad=0.01)
    if title:
        fig.suptitle(title)
    return fig


def alignment_matrix(
    truth: np.ndarray, pred: np.ndarray, tokens: Sequence[str], path: str | Path, rows: int = 16, title: str = ""
) -> Path:
    """truth / pred [N, L] (target mask M and predicted S_align) for the first `rows` images -> two
    heatmaps, one above the other, the figure sized to the tokens and rows it shows."""
    return _save(_alignment_figure(truth, pred, tokens, rows, title), path)
