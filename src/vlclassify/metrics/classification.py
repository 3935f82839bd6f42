"""Classification metrics (single-label); multi-label metrics and recall@precision live beside them."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_report(y_true: np.ndarray, probs: np.ndarray, classnames: list[str]) -> dict[str, Any]:
    """top-1, top-5, per-class accuracy, macro-F1 and the confusion matrix (rows = true class)."""
    from sklearn.metrics import confusion_matrix, f1_score

    y_true = np.asarray(y_true)
    pred = probs.argmax(-1)
    C = len(classnames)
    cm = confusion_matrix(y_true, pred, labels=list(range(C)))
    support = cm.sum(1)
    per_class = {classnames[c]: (float(cm[c, c] / support[c]) if support[c] else None) for c in range(C)}
    k = min(5, C)
    topk = np.argsort(-probs, axis=1)[:, :k]
    return {
        "n": int(len(y_true)),
        "top1": float((pred == y_true).mean()) if len(y_true) else float("nan"),
        "top5": float((topk == y_true[:, None]).any(1).mean()) if len(y_true) else float("nan"),
        "mean_per_class_accuracy": float(np.mean([v for v in per_class.values() if v is not None])),
        "macro_f1": float(f1_score(y_true, pred, labels=list(range(C)), average="macro", zero_division=0)),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }
