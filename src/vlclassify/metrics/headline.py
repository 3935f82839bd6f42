"""The headline numbers of a prediction, computed in one place: what validation selects on, what
`fit` reports, and what the studies tabulate (full reports: `classification_report`,
`multilabel_report`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

KINDS = ("single-label", "multi-label", "multi-task")


def score(
    kind: str,
    targets: Any,
    probs: Any,
    *,
    thresholds: float | Sequence[float | None] | None = None,
) -> dict[str, float]:
    """Headline scores of `probs` against `targets`.

    single-label: targets [N] class indices (< 0 = no label, left out), probs [N, C] scores or
    logits -> {"accuracy"} (NaN without a labelled row).
    multi-label: targets [N, C] 0/1, probs [N, C] -> {"mAP"} (macro over classes with a positive),
    and {"micro-F1"} at `thresholds` (one for all classes or one per class; None per class = never).
    multi-task: targets and probs are {task: single-label targets / probs} -> {"accuracy"}: the mean
    over the tasks with a labelled row, and {"accuracy/<task>"} for each of those.
    """
    if kind == "single-label":
        y, p = np.asarray(targets), np.asarray(probs)
        keep = y >= 0
        return {"accuracy": float((p[keep].argmax(-1) == y[keep]).mean()) if keep.any() else float("nan")}
    if kind == "multi-label":
        from .multilabel import mean_average_precision, multilabel_report

        out = {"mAP": mean_average_precision(targets, probs)}
        if thresholds is not None:
            names = [str(c) for c in range(np.shape(probs)[1])]
            out["micro-F1"] = multilabel_report(targets, probs, names, thresholds)["micro_f1"]
        return out
    if kind == "multi-task":
        t_map: Mapping[str, Any] = targets
        per = {t: score("single-label", t_map[t], probs[t])["accuracy"] for t in t_map}
        per = {t: v for t, v in per.items() if not np.isnan(v)}
        mean = float(np.mean(list(per.values()))) if per else float("nan")
        return {"accuracy": mean, **{f"accuracy/{t}": v for t, v in per.items()}}
    raise ValueError(f"score: kind must be one of {', '.join(KINDS)}, got {kind!r}")
