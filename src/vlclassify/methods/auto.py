"""auto: fit several methods on the same training split and keep the one that scores best on validation.

    m = create_method("auto", backbone)                       # default candidates below
    m = create_method("auto", backbone, candidates=["gda", "linear-probe"], options={"gda": {"input": "joint"}})
    m.fit(train, val)              # every candidate fits; validation accuracy picks one (the one selection rule)
    m.fit_info["auto"]["table"]    # every candidate's validation accuracy and fit time
    m.save_pretrained("out/")      # the winner, an ordinary model of its own method (load_method reads it)

Why: which few-shot method wins depends on the backbone's prior and the data (docs/fewshot.md:
GDA on one set, the probe or Tip-Adapter on another). The choice sees validation only, never test;
`vlclassify bench fewshot` puts auto's test accuracy beside every candidate's, so what choosing on
a few validation images costs is measured, not assumed. Ties go to the candidate nearest `default`
in the list (training/selection.py). A candidate that refuses the data (one line) is recorded in
the table and skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from ..context import RunContext
from ..data.items import Dataset
from ..errors import ConfigError, DataError, VLClassifyError
from ..metrics import score
from ..metrics.openset import KEEP
from ..training import select_best
from .base import SINGLE, Encoded, Method, dataset_of
from .registry import METHODS, register_method

CANDIDATES = ["zero-shot", "linear-probe", "gda", "lp++", "tip-adapter", "cmm"]
# what a candidate runs with unless `options` says otherwise: cmm's fast schedule at the demo's
# budget (its paper schedule is 16,000 steps at batch 8, minutes per fit on a CPU)
BASE_OPTIONS: dict[str, dict[str, Any]] = {"cmm": {"schedule": "fast", "steps": 4000}}


@dataclass(frozen=True)
class AutoConfig:
    """auto's options: the candidate methods, their options, and the tie-break default."""

    candidates: list[str] = field(default_factory=lambda: list(CANDIDATES))  # registered method names, in order
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-candidate options (over BASE_OPTIONS)
    default: str = "gda"  # validation ties go to the candidate nearest this one in the list

    def __post_init__(self) -> None:
        bad = [n for n in self.candidates if n not in METHODS or n == "auto"]
        if not self.candidates or bad:
            raise ConfigError(
                f"auto: unknown candidate(s) {', '.join(bad) or '(none)'}; available: {', '.join(METHODS.names())}"
            )
        if self.default not in self.candidates:
            raise ConfigError(f"auto: default {self.default!r} is not a candidate ({', '.join(self.candidates)})")
        stray = sorted(set(self.options) - set(self.candidates))
        if stray:
            raise ConfigError(f"auto: options for {', '.join(stray)}, which are not candidates")


@register_method
class Auto(Method):
    """Fits the candidate methods on one split and keeps the best on validation (saved as that method)."""

    name = "auto"
    Config = AutoConfig
    selects = "the method"
    needs = frozenset({"image", "pooled"})  # the default candidates' (an instance reads its candidates')
    train_views = ("orig", "flip")

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        c = self.config
        self.members = [
            METHODS.get(n)(backbone, **{**BASE_OPTIONS.get(n, {}), **c.options.get(n, {})}) for n in c.candidates
        ]
        self.winner: Method | None = None

    def feature_needs(self) -> frozenset[str]:
        if self.winner is not None:
            return self.winner.feature_needs()
        return frozenset().union(*(m.feature_needs() for m in self.members))

    def training_views(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v for m in self.members for v in m.training_views()))

    def fit(
        self,
        train: Dataset | Encoded,
        val: Dataset | Encoded | None = None,
        *,
        ctx: RunContext | None = None,
        precision: float | None = None,
        thresholds: str = "per-class",
        keep: float = KEEP,
    ) -> Self:
        """Fit every candidate on `train` under one run context, score each on `val` (accuracy), keep the best."""
        with self.using(ctx):
            return self._choose(train, val, precision, thresholds, keep)

    def _choose(
        self,
        train: Dataset | Encoded,
        val: Dataset | Encoded | None,
        precision: float | None,
        thresholds: str,
        keep: float,
    ) -> Self:
        if val is None or not len(val):
            raise DataError("auto chooses a method on validation data: give a validation split")
        self.check_data(dataset_of(train))
        y = dataset_of(val).labels()
        rows: list[dict[str, Any]] = []
        fitted: dict[str, Method] = {}
        for m in self.members:
            t0 = time.perf_counter()
            try:
                m.fit(train, val, ctx=self.ctx, precision=precision, thresholds=thresholds, keep=keep)
            except VLClassifyError as e:
                rows.append({"method": m.name, "val_accuracy": None, "fit_seconds": None, "error": str(e)})
                continue
            fit_s = time.perf_counter() - t0
            acc = score(SINGLE, y, m.predict_proba(val, ctx=self.ctx))["accuracy"]
            fitted[m.name] = m
            rows.append({"method": m.name, "val_accuracy": acc, "fit_seconds": round(fit_s, 3)})
        if not fitted:
            raise DataError(f"auto: no candidate could fit this data ({rows[0]['error']})")
        val_acc = {r["method"]: r["val_accuracy"] for r in rows}
        names = [n for n in self.config.candidates if n in fitted]
        default = self.config.default if self.config.default in fitted else None
        sel = select_best(names, lambda n: val_acc[n], default)
        self.winner = winner = fitted[sel.best]
        for r in rows:
            r["chosen"] = r["method"] == sel.best
        winner.fit_info["auto"] = {**sel.info("method"), "table": rows}
        self.fit_info = winner.fit_info
        self.classnames, self.task_classes, self.multilabel = winner.classnames, winner.task_classes, winner.multilabel
        self.decisions, self.head, self.head_spec = winner.decisions, winner.head, winner.head_spec
        self.trust = winner.trust  # its calibration and "unknown" rule, chosen on validation
        return self

    def save_pretrained(self, directory: str | Path) -> Path:
        """The winner as an ordinary model of its method, auto's table in its fit_info."""
        self._check_fitted()
        assert self.winner is not None
        return self.winner.save_pretrained(directory)


def auto_table(info: dict[str, Any]) -> list[str]:
    """fit_info["auto"] -> printable lines: each candidate's validation accuracy, the chosen one marked."""
    lines = []
    for r in info["table"]:
        acc = "failed: " + r["error"] if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:6.2f}%"
        lines.append(f"{'*' if r.get('chosen') else ' '} {r['method']:<26} {acc}")
    return lines
