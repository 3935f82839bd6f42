"""Fusion weights that span the prior (issue 23): training/fusion.py's grid and the methods that use it."""

import math

import pytest
import torch

from vlclassify.training.fusion import RATIOS, fusion_grid, ratio_weights, spread


def test_grid_runs_from_zero_shot_only_to_data_only_in_spread_units():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(50, 6, generator=g) * 3.0  # the prior's logits, spread ~3
    data = torch.randn(50, 6, generator=g) * 0.01  # learned logits on a far smaller scale
    grid = fusion_grid(zs, data)
    assert len(grid) == len(RATIOS) and grid[0] == (1.0, 0.0) and grid[-1][0] == 0.0
    k = spread(zs) / spread(data)
    assert k == pytest.approx(300, rel=0.2)  # measured, not assumed: the two scales differ ~300x
    for r, (w_zs, w_data) in zip(RATIOS, grid):
        # the weighted parts have the spreads the ratio says: w_data * spread(data) = r * w_zs * spread(zs)
        if math.isfinite(r):
            assert w_data * spread(data) == pytest.approx(r * w_zs * spread(zs), rel=1e-9)
        assert w_zs + w_data / k == pytest.approx(1.0)  # a convex pair in spread units
    # the ends decide like one part alone, the middle like neither
    y_zs, y_data = zs.argmax(-1), data.argmax(-1)
    fused = [(w_zs * zs + w_data * data).argmax(-1) for w_zs, w_data in grid]
    assert torch.equal(fused[0], y_zs) and torch.equal(fused[-1], y_data)
    mid = fused[RATIOS.index(1.0)]
    assert not torch.equal(mid, y_zs) and not torch.equal(mid, y_data)


def test_spread_ignores_row_offsets_and_constant_rows():
    z = torch.tensor([[0.0, 2.0], [10.0, 12.0]])
    assert spread(z) == pytest.approx(1.0)
    assert spread(torch.ones(3, 4)) == 0.0
    assert fusion_grid(torch.ones(3, 4), torch.randn(3, 4))[-1] == (0.0, 1.0)  # nothing to match: k = 1
    assert ratio_weights(math.inf, 5.0) == (0.0, 5.0) and ratio_weights(0.0, 5.0) == (1.0, 0.0)
