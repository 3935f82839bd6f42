"""Recall at a fixed precision: the operating point of a classifier whose answers go live unreviewed.

Definition (single-label, one task): every item gets its predicted class (the argmax) and that
prediction's confidence (its probability). Predictions are accepted from the most to the least
confident; accepting the top k gives precision_k = correct among them / k and
recall_k = correct among them / N (N = all items with a label, so an item whose prediction is
withheld counts as missed). Cut points lie only between different confidences (ties are
accepted or withheld together, as a threshold would). Recall at precision p is the largest
recall_k with precision_k >= p, and 0.0 when no cut point reaches p. The threshold returned is
the confidence of the last accepted prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def recall_at_precision(y_true: np.ndarray, probs: np.ndarray, precision: float = 0.9) -> dict[str, Any]:
    """{'recall', 'threshold', 'accepted', 'n'} for single-label `probs` [N, C]; labels < 0 are ignored."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    keep = y >= 0
    y, p = y[keep], p[keep]
    n = len(y)
    if n == 0:
        return {"recall": float("nan"), "threshold": None, "accepted": 0, "n": 0}
    conf = p.max(-1)
    correct = (p.argmax(-1) == y).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    conf, correct = conf[order], correct[order]
    tp = np.cumsum(correct)
    k = np.arange(1, n + 1)
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]  # valid cut points: after the last of equal confidences
    ok = last_of_tie & (tp / k >= precision - 1e-12)
    if not ok.any():
        return {"recall": 0.0, "threshold": None, "accepted": 0, "n": n}
    rec = np.where(ok, tp / n, -1.0)
    i = int(np.argmax(rec))  # first index reaching the best recall (the tightest threshold for it)
    return {"recall": float(tp[i] / n), "threshold": float(conf[i]), "accepted": int(k[i]), "n": n}
