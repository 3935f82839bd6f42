"""Telling images of a known class from images of none: AUROC, FPR at 95% TPR, and the
threshold that keeps a target share of the known images.

Every open-set score is "higher = more like a known class". Known images are the positives:
TPR = share of known images kept (score >= threshold), FPR = share of unknown images kept.
"""

from __future__ import annotations

import numpy as np

KEEP = 0.95  # default share of known images kept (the TPR of "FPR at 95% TPR")


def keep_threshold(known: np.ndarray, keep: float = KEEP) -> float:
    """The highest threshold that keeps at least `keep` of the `known` scores (score >= threshold).

    With n scores sorted ascending, floor((1 - keep) * n) of them may fall below: the threshold is
    the next one, so the share kept is in [keep, keep + 1/n) when no two scores tie.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    s = np.sort(np.asarray(known, dtype=np.float64))
    if not len(s):
        raise ValueError("keep_threshold: no known scores")
    drop = int(np.floor((1.0 - keep) * len(s) + 1e-9))
    return float(s[min(drop, len(s) - 1)])


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Probability that a known image scores above an unknown one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    k, u = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if not len(k) or not len(u):
        return float("nan")
    return float(roc_auc_score(np.r_[np.ones(len(k)), np.zeros(len(u))], np.r_[k, u]))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = KEEP) -> float:
    """Share of unknown images kept at the threshold that keeps `tpr` of the known ones."""
    u = np.asarray(unknown, dtype=np.float64)
    if not len(u) or not len(known):
        return float("nan")
    return float(np.mean(u >= keep_threshold(known, tpr)))
