"""How far scores can be taken at their word: expected calibration error, NLL and Brier score.

Single-label scores [N, C] are judged by their top class (ECE: confidence = the top score,
correct = the top class is the label), NLL = mean -log p(label), Brier = mean sum over classes
of (p_c - y_c)^2 (0 perfect, 2 worst). Multi-label scores [N, C] are C independent yes/no
probabilities: every (item, class) score is one binary forecast for ECE, NLL (binary
cross-entropy) and Brier (mean (p - y)^2). Items without a label (single-label y < 0) are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BINS = 15  # equal-width confidence bins of ECE and the reliability diagram (Guo et al. 2017)
EPS = 1e-12


def forecasts(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence [M], outcome [M] 0/1): top score and whether it was right (single-label,
    targets [N]), or every score and its label (multi-label, targets [N, C])."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if y.ndim == 2:
        return p.ravel(), y.astype(np.float64).ravel()
    keep = y >= 0
    p, y = p[keep], y[keep]
    return p.max(-1), (p.argmax(-1) == y).astype(np.float64)


def reliability_bins(conf: np.ndarray, outcome: np.ndarray, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: mean confidence, observed frequency and count ([bins] each; empty bins NaN)."""
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # (0, 1/b] -> bin 0, as Guo et al.
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, bins) / count
        freq = np.bincount(idx, outcome, bins) / count
    return {"confidence": mean_conf, "frequency": freq, "count": count}


def ece(probs: np.ndarray, targets: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the count-weighted mean |frequency - confidence| over the bins."""
    conf, out = forecasts(probs, targets)
    if not len(conf):
        return float("nan")
    r = reliability_bins(conf, out, bins)
    used = r["count"] > 0
    return float(np.sum(r["count"][used] * np.abs(r["frequency"][used] - r["confidence"][used])) / len(conf))


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels (multi-label: mean binary cross-entropy per score)."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if y.ndim == 2:
        y = y.astype(np.float64)
        return float(-np.mean(y * np.log(np.maximum(p, EPS)) + (1 - y) * np.log(np.maximum(1 - p, EPS))))
    keep = y >= 0
    if not keep.any():
        return float("nan")
    return float(-np.mean(np.log(np.maximum(p[keep][np.arange(int(keep.sum())), y[keep]], EPS))))


def brier(probs: np.ndarray, targets: np.ndarray) -> float:
    """Brier score: mean squared error of the scores against the 0/1 labels (see the module docstring)."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if y.ndim == 2:
        return float(np.mean((p - y) ** 2))
    keep = y >= 0
    if not keep.any():
        return float("nan")
    p, y = p[keep], y[keep]
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_report(probs: np.ndarray, targets: np.ndarray, raw: np.ndarray | None = None) -> dict[str, Any]:
    """{'ece', 'nll', 'brier'} of `probs`, and with the uncalibrated scores `raw` their
    'ece_raw', 'nll_raw', 'brier_raw' (eval-test.json's names)."""
    out = {"ece": ece(probs, targets), "nll": nll(probs, targets), "brier": brier(probs, targets)}
    if raw is not None:
        out.update({"ece_raw": ece(raw, targets), "nll_raw": nll(raw, targets), "brier_raw": brier(raw, targets)})
    return out
