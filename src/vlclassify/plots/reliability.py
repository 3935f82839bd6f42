"""Reliability diagram: observed frequency against confidence, one panel per set of scores
(calibrated and raw side by side), the gap to the diagonal shaded, ECE in each title."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..metrics.calibration import BINS, ece, forecasts, reliability_bins
from .multilabel import _plt, _save


def reliability_diagram(
    scores: Mapping[str, np.ndarray], targets: np.ndarray, path: str | Path, title: str = "", bins: int = BINS
) -> Path:
    """One panel per entry of `scores` ({name: [N, C] scores}, e.g. calibrated and raw) against
    `targets` ([N] labels or [N, C] 0/1), written as a PNG at `path`."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 4.4), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    width = 1 / bins
    for ax, (name, probs) in zip(axes[0], scores.items(), strict=True):
        conf, out = forecasts(probs, targets)
        r = reliability_bins(conf, out, bins)
        used = r["count"] > 0
        freq = np.where(used, r["frequency"], 0.0)
        ax.bar(edges[:-1], freq, width=width, align="edge", color="#4c72b0", edgecolor="white", label="observed")
        gap_lo = np.minimum(freq, np.nan_to_num(r["confidence"]))
        gap = np.abs(freq - np.nan_to_num(r["confidence"]))
        ax.bar(
            edges[:-1][used],
            gap[used],
            bottom=gap_lo[used],
            width=width,
            align="edge",
            color="#dd8452",
            alpha=0.5,
            edgecolor="none",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"{name}: ECE {ece(probs, targets, bins):.3f} (n = {len(conf)})", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
