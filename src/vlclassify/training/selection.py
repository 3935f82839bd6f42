"""The one selection rule for searches without gradients (C grids, alpha/beta grids, thresholds).

    sel = select_best(candidates, evaluate)   # evaluate(c) -> validation score (higher is better)
    sel.best, sel.score, sel.tied            # the choice, its score, how many candidates tied

Candidates are given in order of preference: the simplest or most prior-like first (the strongest
regularisation, the smallest residual weight on top of zero-shot). The best validation score
wins; among tied candidates the first in that order wins. The trainer's keep-best rule is the
same rule in time order: a later checkpoint must strictly beat the earlier ones.

Why this tie-break: on few-shot validation sets (4 images per class) most candidates tie. The
rule used before, lowest validation NLL among the tied, picked alpha = 10 for Tip-Adapter on a
4-class photo set where every alpha tied at 40% (test 38.9% against 58.3% for zero-shot): NLL on
ten images rewards the sharpest cache logits, not the best classifier. benchmarks/studies/
tie_break.py measures both rules on the few-shot tables (docs/results/tie-break.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

C = TypeVar("C")
TIE_TOLERANCE = 1e-9  # scores closer than this are a tie (validation accuracies are ratios of small counts)


@dataclass
class Selection(Generic[C]):
    """The outcome of a search: what was chosen and how clearly."""

    best: C  # the chosen candidate
    score: float  # its validation score
    scores: list[float] = field(default_factory=list)  # every candidate's score, in candidate order
    tied: int = 1  # candidates whose score equals the best (1 = a clear winner)
    rule: str = "first"  # how ties were broken

    def info(self, name: str) -> dict[str, Any]:
        """A JSON-able record for fit_info: `{name: best, name_score, name_tied, name_candidates}`."""
        return {
            name: _jsonable(self.best),
            f"{name}_score": self.score,
            f"{name}_tied": self.tied,
            f"{name}_candidates": len(self.scores),
            f"{name}_rule": self.rule,
        }


def select_best(
    candidates: Sequence[C],
    evaluate: Callable[[C], float | tuple[float, float]],
    rule: str = "first",
) -> Selection[C]:
    """Evaluate every candidate on validation data and pick one.

    evaluate(c) returns the score (higher is better), or (score, loss) for rule="loss", which
    breaks ties by the lower loss instead of the candidate order (kept for the tie-break study).
    A NaN score never wins.
    """
    if not candidates:
        raise ValueError("select_best: no candidates")
    if rule not in ("first", "loss"):
        raise ValueError(f"select_best: rule must be first or loss, got {rule!r}")
    results = [evaluate(c) for c in candidates]
    scores = [float(r[0]) if isinstance(r, tuple) else float(r) for r in results]
    finite = [s for s in scores if math.isfinite(s)]
    top = max(finite) if finite else float("nan")
    tied = [i for i, s in enumerate(scores) if math.isfinite(s) and s >= top - TIE_TOLERANCE] or [0]
    if rule == "loss":
        losses = [float(results[i][1]) if isinstance(results[i], tuple) else 0.0 for i in tied]
        pick = tied[min(range(len(tied)), key=lambda j: losses[j])]
    else:
        pick = tied[0]
    return Selection(candidates[pick], scores[pick], scores, len(tied), rule)


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    return x
