"""Multi-label metrics: subset accuracy, per-label precision/recall/F1, macro and micro average
precision (mAP), ROC-AUC, and the decision threshold chosen on validation data.

Classes without a positive (or without a negative) in the evaluated set have no AP (no ROC-AUC):
they are reported as None and left out of the macro means, and the number used is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.025), 4)


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(
            f"multi-label metrics need y_true and probs of the same [N, C] shape, got {y.shape} and {p.shape}"
        )
    return y, p


def per_class_ap(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """[C] average precision per class (None for a class with no positive)."""
    from sklearn.metrics import average_precision_score

    y, p = _check(y_true, probs)
    return [float(average_precision_score(y[:, c], p[:, c])) if y[:, c].any() else None for c in range(y.shape[1])]


def mean_average_precision(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro mAP over the classes that have a positive."""
    aps = [a for a in per_class_ap(y_true, probs) if a is not None]
    return float(np.mean(aps)) if aps else float("nan")


def _micro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float((pred * y).sum())
    denom = float(pred.sum() + y.sum())
    return 2 * tp / denom if denom else 0.0


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp, fp, fn = (pred * y).sum(0), (pred * (1 - y)).sum(0), ((1 - pred) * y).sum(0)
    denom = 2 * tp + fp + fn
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)))


def _subset_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float((pred == y).all(1).mean())


def best_threshold(
    y_true: np.ndarray, probs: np.ndarray, criterion: str = "micro_f1", grid: np.ndarray | None = None
) -> float:
    """One global threshold maximising `criterion` (micro_f1 | macro_f1 | subset_accuracy) on the
    given (validation) data; ties go to the threshold closest to 0.5."""
    y, p = _check(y_true, probs)
    fns = {
        "micro_f1": _micro_f1,
        "macro_f1": _macro_f1,
        "subset_accuracy": _subset_accuracy,
    }
    if criterion not in fns:
        raise ValueError(f"threshold criterion must be one of {', '.join(fns)}, got {criterion!r}")
    grid = THRESHOLD_GRID if grid is None else np.asarray(grid)
    scores = [(fns[criterion](y, (p >= t).astype(np.float64)), -abs(t - 0.5), float(t)) for t in grid]
    return max(scores)[2]


def multilabel_report(
    y_true: np.ndarray, probs: np.ndarray, classnames: list[str], threshold: float | Sequence[float | None] = 0.5
) -> dict[str, Any]:
    """Everything the DiCLS paper reports (and more) at the decision threshold(s): one for every
    class, or one per class (None = never predicted)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, p = _check(y_true, probs)
    if y.shape[1] != len(classnames):
        raise ValueError(f"{y.shape[1]} label columns but {len(classnames)} class names")
    given = np.asarray(threshold, dtype=object)  # a scalar, or [C] with None for "never"
    thr = np.broadcast_to(
        np.array([np.inf if t is None else t for t in np.atleast_1d(given)], dtype=np.float64), (y.shape[1],)
    )
    pred = (p >= thr[None]).astype(np.float64)
    tp, fp, fn = (pred * y).sum(0), (pred * (1 - y)).sum(0), ((1 - pred) * y).sum(0)
    prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 0.0)
    rec = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1e-12), 0.0)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    aps = per_class_ap(y, p)
    aucs = [float(roc_auc_score(y[:, c], p[:, c])) if 0 < y[:, c].sum() < len(y) else None for c in range(y.shape[1])]
    ok_ap, ok_auc = [a for a in aps if a is not None], [a for a in aucs if a is not None]
    has_both = y.any() and (1 - y).any()
    per_class = {
        name: {
            "precision": float(prec[c]),
            "recall": float(rec[c]),
            "f1": float(f1[c]),
            "ap": aps[c],
            "roc_auc": aucs[c],
            "support": int(y[:, c].sum()),
        }
        for c, name in enumerate(classnames)
    }
    mtp, mfp, mfn = tp.sum(), fp.sum(), fn.sum()
    return {
        "n": int(len(y)),
        "threshold": float(thr[0]) if given.ndim == 0 else [None if np.isinf(t) else float(t) for t in thr],
        "subset_accuracy": float((pred == y).all(1).mean()) if len(y) else float("nan"),
        "label_accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "macro_precision": float(prec.mean()),
        "macro_recall": float(rec.mean()),
        "macro_f1": float(f1.mean()),
        "micro_precision": float(mtp / max(mtp + mfp, 1e-12)),
        "micro_recall": float(mtp / max(mtp + mfn, 1e-12)),
        "micro_f1": float(2 * mtp / max(2 * mtp + mfp + mfn, 1e-12)),
        "macro_mAP": float(np.mean(ok_ap)) if ok_ap else float("nan"),
        "micro_mAP": float(average_precision_score(y.ravel(), p.ravel())) if y.any() else float("nan"),
        "macro_roc_auc": float(np.mean(ok_auc)) if ok_auc else float("nan"),
        "micro_roc_auc": float(roc_auc_score(y.ravel(), p.ravel())) if has_both else float("nan"),
        "classes_scored": {"ap": len(ok_ap), "roc_auc": len(ok_auc), "total": len(classnames)},
        "per_class": per_class,
    }
