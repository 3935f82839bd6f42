"""What `vlclassify eval` says about a model's scores: calibration (ECE, NLL, Brier; calibrated
and raw; a reliability diagram) and, given images of no known class (`--unknown`), how well each
open-set score tells them from the evaluated images (AUROC, FPR at 95% TPR), the chosen one marked.

Names in eval-<split>.json: `ece`, `ece_raw`, `nll`, `nll_raw`, `brier`, `brier_raw`,
`calibration` (the rule), and `unknown.auroc`, `unknown.fpr_at_95tpr` ({score: value}),
`unknown.chosen`, `unknown.answered_unknown` ({known, unknown}: the share the model's own rule
calls "unknown").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..metrics.calibration import calibration_report
from ..metrics.openset import KEEP, auroc, fpr_at_tpr

if TYPE_CHECKING:
    from ..context import RunContext
    from ..data.items import Dataset
    from ..methods.base import Encoded, Method


def unknown_images(spec: str, classnames: list[str]) -> Dataset:
    """Images of no known class for `eval --unknown`: every image under a folder (its sub-folders
    are not classes), or a data spec's test split (else all of its rows), labels dropped."""
    from ..data.items import Dataset, Item
    from ..data.loaders import IMAGE_EXTS, file_key
    from ..data.spec import load_data
    from ..errors import DataError

    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        items = [Item(image=str(f), key=file_key(f), origin=str(f)) for f in files]
    else:
        parts = load_data(spec)
        rows = parts.get("test") or parts.get("all") or [it for ds in parts.values() for it in ds.items]
        src = rows.items if isinstance(rows, Dataset) else rows
        items = [Item(image=it.image, text=it.text, key=it.key, origin=it.origin) for it in src]
    if not items:
        raise DataError(f"--unknown {spec}: no images found")
    return Dataset(items=items, classnames=list(classnames), name=f"unknown:{p.name or spec}")


def trust_report(
    method: Method,
    ds: Dataset | Encoded,
    targets: np.ndarray,
    unknown: Dataset | None = None,
    plot: str | Path | None = None,
    title: str = "",
    ctx: RunContext | None = None,
) -> dict[str, Any]:
    """Calibration metrics of `method` on `ds` (targets: [N] labels or [N, C] 0/1), a reliability
    diagram at `plot` (calibrated vs raw), and with `unknown` the open-set metrics."""
    from ..methods.base import MAIN

    probs = method.predict_proba(ds, ctx=ctx)
    raw = method.predict_proba(ds, ctx=ctx, calibrated=False)
    out: dict[str, Any] = calibration_report(probs, targets, raw)
    out["calibration"] = method.calibration(MAIN).describe()
    if plot is not None:
        from ..plots.reliability import reliability_diagram

        out["reliability_png"] = str(reliability_diagram({"calibrated": probs, "raw": raw}, targets, plot, title))
    if unknown is not None:
        rule = method.trust.open_set
        known_s = method.open_set_scores(ds, ctx=ctx)
        unknown_s = method.open_set_scores(unknown, ctx=ctx)
        out["unknown"] = {
            "n_known": len(ds),
            "n_unknown": len(unknown),
            "chosen": rule.score or None,
            "rule": rule.describe(),
            "auroc": {s: auroc(known_s[s], unknown_s[s]) for s in known_s},
            "fpr_at_95tpr": {s: fpr_at_tpr(known_s[s], unknown_s[s], KEEP) for s in known_s},
            "answered_unknown": {
                "known": float(np.mean(rule.unknown(known_s))),
                "unknown": float(np.mean(rule.unknown(unknown_s))),
            },
        }
    return out


def model_lines(method: Method) -> list[str]:
    """The lines `vlclassify fit` prints of a fitted model's calibration and "unknown" rule."""
    lines = [f"calibration ({method.task_name(t)}): {c.describe()}" for t, c in method.trust.calibrations.items()]
    return [*lines, f"unknown: {method.trust.open_set.describe()}"]


def trust_lines(rep: dict[str, Any]) -> list[str]:
    """The lines `vlclassify eval` prints of a `trust_report`."""
    lines = [
        f"calibration: {rep['calibration']}",
        f"ECE (15 bins) {rep['ece']:.4f} calibrated, {rep['ece_raw']:.4f} raw; "
        f"NLL {rep['nll']:.4f} ({rep['nll_raw']:.4f} raw); Brier {rep['brier']:.4f} ({rep['brier_raw']:.4f} raw)",
    ]
    if "reliability_png" in rep:
        lines.append(f"wrote {rep['reliability_png']} (reliability diagram, calibrated and raw)")
    u = rep.get("unknown")
    if u:
        lines.append(f"unknown images: {u['n_unknown']} against {u['n_known']} known ({u['rule']})")
        for s in u["auroc"]:
            mark = "  <- chosen" if s == u["chosen"] else ""
            lines.append(f"  {s:<12} AUROC {u['auroc'][s]:.4f}  FPR@95%TPR {u['fpr_at_95tpr'][s]:.4f}{mark}")
        a = u["answered_unknown"]
        share = f"{100 * a['unknown']:.1f}% of the unknown images, {100 * a['known']:.1f}% of the known"
        lines.append(f"  answered 'unknown': {share}")
    return lines
