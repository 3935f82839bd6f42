"""The one selection rule for searches without gradients (C grids, alpha/beta grids, thresholds).

    sel = select_best(candidates, evaluate, default=c0)  # evaluate(c) -> validation score (higher is better)
    sel.best, sel.score, sel.tied                       # the choice, its score, how many candidates tied

The best validation score wins; among the candidates tied at it, the one nearest the method's
default (the value it uses without validation data; distance = position in the candidate list)
wins, and with no default the first. The trainer's keep-best rule is the same rule over the
rounds of a stage, its default being the last round (what the stage ends on without validation):
ties go to the later round, and the starting weights are kept only when no round matches them.

Why this tie-break (docs/results/tie-break.md, `python benchmarks/studies/tie_break.py --data
fashion-mnist --data tuxpaint`): on few-shot validation sets (1-4 images per class) many
candidates tie — all 80 (alpha, beta) pairs of Tip-Adapter at 1 shot. Over 5 shots x 3 seeds x
2 datasets x 3 searches (linear-probe C, Tip-Adapter alpha/beta, CMM alpha), mean test accuracy
by tie-break: nearest the default 54.00, lowest validation NLL 54.09, the middle of the tied run
53.99, the first in the grid 53.22. NLL and the default are level on average, but NLL on ten
images rewards the sharpest logits: it picked alpha = 10 for Tip-Adapter on a 4-class photo set
where every alpha tied at 40% (test 38.9% against 58.3% for zero-shot), and it loses 1 point to
the default on Tux Paint at 1 shot. The default never leaves the method's no-validation behaviour
without evidence.
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

    def info(self, name: str) -> dict[str, Any]:
        """A JSON-able record for fit_info: `{name: best, name_score, name_tied, name_candidates}`."""
        return {
            name: _jsonable(self.best),
            f"{name}_score": self.score,
            f"{name}_tied": self.tied,
            f"{name}_candidates": len(self.scores),
        }


def select_best(candidates: Sequence[C], evaluate: Callable[[C], float], default: C | None = None) -> Selection[C]:
    """Evaluate every candidate on validation data and pick the best (ties: nearest `default`).

    A NaN score never wins; `default` must be one of the candidates (None: ties go to the first).
    """
    if not candidates:
        raise ValueError("select_best: no candidates")
    anchor = 0 if default is None else list(candidates).index(default)
    scores = [float(evaluate(c)) for c in candidates]
    finite = [s for s in scores if math.isfinite(s)]
    top = max(finite) if finite else float("nan")
    tied = [i for i, s in enumerate(scores) if math.isfinite(s) and s >= top - TIE_TOLERANCE] or [anchor]
    pick = min(tied, key=lambda i: (abs(i - anchor), i))
    return Selection(candidates[pick], scores[pick], scores, len(tied))


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    return x
