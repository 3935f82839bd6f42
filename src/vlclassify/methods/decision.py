"""Decisions, not only scores: the rule a fitted model answers with, chosen on validation.

    single-label   argmax                 the top class
                   precision (target p)   the top class when its score reaches the class's threshold,
                                          chosen on validation so that precision >= p; else "uncertain"
    multi-label    thresholds             the labels whose score reaches their threshold: one per class
                                          (its best validation F1, shrunk halfway to the global one) or
                                          one global (best validation micro-F1)

Why shrunk: a class's F1-optimal threshold on a few dozen validation positives is noisy (as low as
0.01); halfway to the global threshold keeps the class-specific part. Linear probe, test micro-F1
/ macro-F1 (docs/results/thresholds.md, `python benchmarks/studies/thresholds.py`): Tux Paint
composites global 60.4 / 46.8, per-class 50.0 / 47.3, shrunk 61.5 / 49.4; Fashion-MNIST mosaics
78.1 / 78.4, 76.6 / 77.2, 77.7 / 78.1.

A rule is saved with the model (config.json "decisions") and applied by predict, eval, serve and
export alike. Per-class thresholds need enough validation evidence: a class with fewer than
MIN_EVIDENCE validation predictions (precision) or no validation positive (multi-label) uses the
global threshold, and the rule says how many classes did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..metrics.multilabel import THRESHOLD_GRID
from ..metrics.ranking import recall_at_precision
from ..training.selection import select_best

KINDS = ("argmax", "precision", "thresholds")
MAIN = "label"  # the task name of a dataset's main label
MIN_EVIDENCE = 10  # validation predictions of a class before it gets a threshold of its own
# multi-label threshold candidates (ties go to the one nearest 0.5); small values serve softmax scores
GRID = sorted({*np.round(THRESHOLD_GRID, 4).tolist(), 0.01, 0.02, 0.03, 0.04})
UNCERTAIN = "uncertain"


@dataclass
class DecisionRule:
    """How scores [N, C] become answers; `thresholds[c]` None means class c is never accepted."""

    kind: str = "argmax"  # argmax | precision | thresholds
    thresholds: list[float | None] | None = None  # [C] per-class score thresholds (precision, thresholds)
    target_precision: float | None = None  # the precision the thresholds were chosen to reach (kind precision)
    source: str = "default"  # validation | default: where the rule came from
    note: str = ""  # what a user should know (fallbacks, missing validation data)
    per_class: int = 0  # classes with a threshold of their own (the rest use the global one)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"decision kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind != "argmax" and self.thresholds is None:
            raise ConfigError(f"decision kind {self.kind!r} needs thresholds")

    @property
    def multilabel(self) -> bool:
        """Whether the rule answers with a set of labels ([N, C] bool) rather than one class."""
        return self.kind == "thresholds"

    def _thresholds(self) -> list[float | None]:
        assert self.thresholds is not None, "__post_init__: every kind but argmax has thresholds"
        return self.thresholds

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """probs [N, C] -> single-label: [N] class index, -1 = uncertain; multi-label: [N, C] bool."""
        p = np.asarray(probs, dtype=np.float64)
        if self.kind == "argmax":
            top: np.ndarray = p.argmax(-1)
            return top
        thr = np.array([np.inf if t is None else t for t in self._thresholds()], dtype=np.float64)
        if len(thr) != p.shape[-1]:
            raise ConfigError(f"decision rule has {len(thr)} thresholds but the scores have {p.shape[-1]} classes")
        if self.kind == "thresholds":
            return p >= thr[None]
        top = p.argmax(-1)
        return np.where(p[np.arange(len(p)), top] >= thr[top], top, -1)

    def describe(self) -> str:
        """One line for the CLI."""
        if self.kind == "argmax":
            return "the top class"
        if self.kind == "precision":
            target = self.target_precision or 0.0  # set for this kind (__post_init__)
            return (
                f"the top class when its score reaches the threshold for {100 * target:.0f}% "
                f"precision on validation ({self.per_class} of {len(self._thresholds())} classes with a threshold of "
                f"their own), else "
                f"'{UNCERTAIN}'"
            )
        vals = [t for t in self._thresholds() if t is not None]
        rng = f"{min(vals):.3f}" if len(set(vals)) == 1 else f"{min(vals):.3f}-{max(vals):.3f}"
        return f"every label scoring >= its threshold ({rng}; {self.per_class} per-class, {self.source})"

    def to_dict(self) -> dict[str, Any]:
        """JSON for config.json "decisions" (`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], num_classes: int, where: str = "decision") -> DecisionRule:
        """Read back a saved rule, checking it against the model's class count; errors name `where`."""
        try:
            rule = cls(**d)
        except TypeError as e:
            raise ConfigError(f"{where}: not a decision rule ({e})") from None
        if rule.thresholds is not None and len(rule.thresholds) != num_classes:
            raise ConfigError(f"{where}: {len(rule.thresholds)} thresholds for {num_classes} classes")
        return rule


@dataclass
class TaskPrediction:
    """One task's answer for one item: the decision and the top scores."""

    labels: list[str]  # the decision: [class] (single-label), the labels found (multi-label), [] = uncertain/none
    scores: list[tuple[str, float]]  # the top classes, best first
    uncertain: bool = False  # single-label: the top class did not reach its threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON for the CLI and the HTTP API: {"labels", "uncertain", "scores": [{"label", "score"}]}."""
        return {
            "labels": self.labels,
            "uncertain": self.uncertain,
            "scores": [{"label": c, "score": s} for c, s in self.scores],
        }


@dataclass
class Prediction:
    """What a model says about one item: a decision per task, scores, and (cma-clip) modality weights.

    `scores` follows the Hugging Face image-classification convention ([{"label", "score"}], best
    first) in `to_dict()`; `tasks` maps each task to its TaskPrediction, the main task first.
    """

    tasks: dict[str, TaskPrediction]
    modality_weights: dict[str, dict[str, float]] | None = None  # task -> {"image": w, "text": 1 - w}
    item: str = ""  # the image path or item key
    unknown: bool = False  # the image looks like none of the classes (its open-set score is below the threshold)
    open_set: dict[str, Any] | None = None  # {"score": name, "value": v, "threshold": t | None} (trust/openset.py)

    @property
    def main(self) -> TaskPrediction:
        """The main task's answer (the first task)."""
        return next(iter(self.tasks.values()))

    @property
    def labels(self) -> list[str]:
        """The main task's decision (see TaskPrediction.labels)."""
        return self.main.labels

    @property
    def scores(self) -> list[tuple[str, float]]:
        """The main task's top (class, score) pairs, best first."""
        return self.main.scores

    def to_dict(self) -> dict[str, Any]:
        """JSON with the main task's answer at the top level (and "unknown", with the open-set
        score that decided it), the other tasks under "tasks"."""
        out: dict[str, Any] = {"item": self.item, **self.main.to_dict(), "unknown": self.unknown}
        if self.open_set is not None:
            out["open_set"] = self.open_set
        if len(self.tasks) > 1:
            out["tasks"] = {t: p.to_dict() for t, p in self.tasks.items()}
        if self.modality_weights is not None:
            out["modality_weights"] = self.modality_weights
        return out


def task_prediction(probs: np.ndarray, decided: np.ndarray | int, classnames: list[str], top: int) -> TaskPrediction:
    """probs [C] and a decision (class index, -1, or [C] bool) -> TaskPrediction."""
    order = np.argsort(-probs, kind="stable")[: max(1, top)]
    scores = [(classnames[i], float(probs[i])) for i in order]
    if isinstance(decided, int) or np.ndim(decided) == 0:
        c = int(decided)
        return TaskPrediction([classnames[c]] if c >= 0 else [], scores, uncertain=c < 0)
    found = [classnames[i] for i in np.argsort(-probs, kind="stable") if decided[i]]
    return TaskPrediction(found, scores)


# ---- choosing a rule on validation --------------------------------------------------------------
def default_rule(multilabel: bool, num_classes: int, note: str = "") -> DecisionRule:
    """Without validation data: argmax, or (multi-label) labels scoring above 0.5."""
    if not multilabel:
        return DecisionRule("argmax", note=note)
    return DecisionRule("thresholds", [0.5] * num_classes, source="default", note=note)


def choose_rule(
    probs: np.ndarray | None,
    targets: np.ndarray | None,
    multilabel: bool,
    num_classes: int,
    precision: float | None = None,
    per_class: bool = True,
    default: DecisionRule | None = None,
) -> DecisionRule:
    """The decision rule for validation scores `probs` [N, C] and labels `targets` ([N] or [N, C] 0/1).

    precision: single-label target precision (None = argmax). per_class: multi-label per-class
    thresholds (False = one global threshold). Without validation data, `default` (or default_rule).
    """
    if precision is not None and not 0.0 < precision < 1.0:
        raise ConfigError(f"target precision must be in (0, 1), got {precision}")
    if probs is None or targets is None or not len(probs):
        rule = default or default_rule(multilabel, num_classes)
        if precision is not None and not multilabel:
            rule = DecisionRule(
                "precision",
                [None] * num_classes,
                precision,
                "default",
                f"no validation data: no threshold can reach the target precision, every answer is '{UNCERTAIN}'",
            )
        return rule
    p = np.asarray(probs, dtype=np.float64)
    if multilabel:
        return _multilabel_rule(p, np.asarray(targets, dtype=np.float64), per_class)
    if precision is None:
        return DecisionRule("argmax", source="validation")
    return _precision_rule(p, np.asarray(targets), precision)


def _precision_rule(p: np.ndarray, y: np.ndarray, target: float) -> DecisionRule:
    glob = recall_at_precision(y, p, target)["threshold"]
    pred = p.argmax(-1)
    thr: list[float | None] = []
    own = 0
    for c in range(p.shape[1]):
        mine = (pred == c) & (y >= 0)
        t = glob
        if mine.sum() >= MIN_EVIDENCE:
            t = recall_at_precision(y[mine], p[mine], target)["threshold"]
            own += 1
        thr.append(None if t is None else float(t))
    note = ""
    if glob is None:
        note = f"no threshold reaches {100 * target:.0f}% precision on validation overall"
    if all(t is None for t in thr):
        note += f"; every answer is '{UNCERTAIN}'"
    return DecisionRule("precision", thr, target, "validation", note.strip("; "), own)


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float((pred * y).sum())
    denom = float(pred.sum() + y.sum())
    return 2 * tp / denom if denom else 0.0


def _multilabel_rule(p: np.ndarray, y: np.ndarray, per_class: bool) -> DecisionRule:
    glob = select_best(GRID, lambda t: _f1(y, (p >= t).astype(np.float64)), default=0.5).best
    thr: list[float | None] = [float(glob)] * p.shape[1]
    own = 0
    if per_class:
        for c in range(p.shape[1]):
            if y[:, c].any():
                f1 = lambda t, c=c: _f1(y[:, c], (p[:, c] >= t).astype(np.float64))  # noqa: E731
                thr[c] = 0.5 * (float(select_best(GRID, f1, default=0.5).best) + glob)  # shrunk halfway
                own += 1
    note = (
        ""
        if own == p.shape[1] or not per_class
        else (f"{p.shape[1] - own} class(es) without a validation positive use the global threshold {glob:.3f}")
    )
    return DecisionRule("thresholds", thr, None, "validation", note, own)
