"""Fusion weights that span the prior: from "zero-shot only" to "data only", in units of the logits' spread.

    pairs = fusion_grid(zs_train, data_train)   # [(w_zs, w_data), ...], zero-shot only first
    fused = w_zs * zs + w_data * data           # every fusing method's logits (tip-adapter, cmm, gda, lp++)

Why: the papers search the weight of the learned logits in absolute units that assume CLIP's
prior and scale (Tip-Adapter's alpha 0.1-10, CMM's 0.1-2.0). Where the zero-shot prior is weak
(our offline default everywhere; CLIP on satellite, texture or medical images) the best weight
lies far outside such a grid, and the fused model collapses towards the weak prior: Tip-Adapter
scored 18.2 at 4 shots on a 9-category emoji set with its grid, 54.0 with one reaching alpha 1000
(issue 23). Here both logit sets are first brought to one scale by their spread on the training
data (`spread`: the mean over rows of the standard deviation across classes, which is what
moves an argmax), and the grid runs over the ratio r of the data's weight to the prior's, from
0 (zero-shot only) through 1 (equal say) to infinity (data only), evenly in log r. The weights
are a convex pair (w_zs = 1 - l, w_data = l * k with l = r / (1 + r), k = spread(zs) /
spread(data)), so the fused logits keep the zero-shot logits' scale at both ends and the softmax
stays comparable across the grid.
"""

from __future__ import annotations

import math

import torch

# the data's weight relative to the prior's, after both are brought to one spread: 0 = zero-shot
# only, inf = data only; the middle (1, equal say) is the default without validation data
RATIOS: tuple[float, ...] = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, math.inf)
DEFAULT_RATIO = 1.0


def spread(logits: torch.Tensor) -> float:
    """[N, C] logits -> the mean over rows of their standard deviation across classes (what moves an
    argmax; a constant added to a row does not count). 0 for constant rows."""
    z = logits.double()
    return float(z.std(dim=-1, unbiased=False).mean()) if z.numel() else 0.0


def ratio_weights(ratio: float, k: float) -> tuple[float, float]:
    """(w_zs, w_data) of one ratio: the convex pair 1 - l, l * k with l = r / (1 + r) (r = inf: 0, k)."""
    lam = 1.0 if math.isinf(ratio) else ratio / (1.0 + ratio)
    return 1.0 - lam, lam * k


def spread_scale(zs: torch.Tensor, data: torch.Tensor) -> float:
    """k = spread(zs) / spread(data): the factor that gives the data logits the prior's spread
    (1 when either is constant: nothing to match)."""
    s_zs, s_data = spread(zs), spread(data)
    return s_zs / s_data if s_zs > 0 and s_data > 0 else 1.0


def fusion_grid(zs: torch.Tensor, data: torch.Tensor, ratios: tuple[float, ...] = RATIOS) -> list[tuple[float, float]]:
    """[(w_zs, w_data)] for `ratios`, zero-shot only first, from the training logits zs [N, C] and
    data [N, C] (the learned part at weight 1)."""
    k = spread_scale(zs, data)
    return [ratio_weights(r, k) for r in ratios]
