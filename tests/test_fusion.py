"""The best few-shot classifier whatever the prior (issue 23): training/fusion.py's grid from
zero-shot only to data only, gda, lp++ and auto."""

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


def test_gda_is_lda_with_the_papers_shrinkage():
    """GDA's W, b equal scikit-learn's LinearDiscriminantAnalysis (lsqr, uniform priors) at the
    shrinkage s = D / (N - 1 + D) that (N - 1) S + tr(S) I is, up to GDA's scale D(1 - s) / N:
    x W' + b = c * decision_function(x) + (1 - c) log(1/K)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from vlclassify.methods.gda import gda_classifier

    g = torch.Generator().manual_seed(1)
    k, per, d = 3, 5, 8
    y = torch.arange(k).repeat_interleave(per)
    x = torch.nn.functional.normalize(
        torch.randn(k * per, d, generator=g) + 2 * torch.randn(k, d, generator=g)[y], dim=-1
    )
    w, b = gda_classifier(x, y, k)
    n = len(y)
    s = d / (n - 1 + d)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s, priors=[1 / k] * k).fit(x.double().numpy(), y.numpy())
    c = d * (1 - s) / n
    q = torch.nn.functional.normalize(torch.randn(20, d, generator=g), dim=-1)
    ours = (q @ w.T + b).double()
    theirs = c * torch.from_numpy(lda.decision_function(q.double().numpy())) + (1 - c) * math.log(1 / k)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["paper", "spread"])
def test_lp_pp_starts_from_its_init_and_steps_by_its_lipschitz_bounds(init, toy, tmp_path):
    """One full-batch epoch without momentum moves W by -4N/lambda_max(X'X) * dL/dW and alpha by
    -N/(4 max_k sum_i s_ik^2) * dL/dalpha, from W = the class sums and alpha = 250 x the mean own-class
    similarity (the public code's init) or the visual part's spread over the text's, computed here in
    the natural parametrisation."""
    import numpy as np
    import torch.nn.functional as F

    from conftest import make_color_folder
    from vlclassify.data import image_folder
    from vlclassify.features import extract_features
    from vlclassify.methods import Encoded, create_method

    ds = image_folder(make_color_folder(tmp_path / "colors", per_class=4))["all"]
    enc = Encoded(ds, extract_features(toy, ds, views=("orig", "flip"), progress=False))
    m = create_method("lp++", toy, epochs=1, momentum=0.0, alpha_init=init)
    m.fit(enc)  # no validation: the stage keeps its last (only) epoch
    rows = m.train_tensors(enc)
    x, j, y = F.normalize(rows["pooled"], dim=-1), F.normalize(rows["image"], dim=-1), rows["targets"]
    n, k = len(y), len(ds.classnames)
    t = m.head.texts
    s = j @ t.T  # [N, C]
    onehot = F.one_hot(y, k).float()
    w0 = (onehot.T @ x) / 2  # class sums over the images: 2 views each
    paper = 250 * float(((onehot * s).sum(0) / onehot.sum(0)).mean())
    a0 = torch.full((k,), paper if init == "paper" else spread(x @ ((onehot.T @ x) / 2).T) / spread(s))
    a0.requires_grad_(True)
    w0.requires_grad_(True)
    b0 = torch.zeros(k, requires_grad=True)
    F.cross_entropy(x @ w0.T + b0 + a0 * s, y).backward()
    step_w = 4 * n / float(torch.linalg.eigvalsh(x.double().T @ x.double()).max())
    step_a = n / (4 * float((s.double() ** 2).sum(0).max()))
    sw, sa = (float(v) for v in m.head.steps)
    assert (sw**2, sa**2) == pytest.approx((step_w, step_a), rel=1e-4)
    torch.testing.assert_close(sw * m.head.u, w0 - step_w * w0.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sw * m.head.ub, b0 - step_w * b0.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sa * m.head.v, a0 - step_a * a0.grad, rtol=1e-4, atol=1e-4)
    # without validation the trained blend is kept, scaled so its logits have zero-shot's spread
    w_t, w_v = m.fit_info["fusion"]
    fused = m.head.parts({"image": rows["image"], "pooled": rows["pooled"]})
    assert w_t == w_v and spread(w_t * (fused[0] + fused[1])) == pytest.approx(
        spread(float(toy.logit_scale) * s), rel=1e-4
    )
    assert np.isfinite(m.predict_proba(enc)).all()


def test_auto_keeps_the_best_on_validation_and_saves_it_as_an_ordinary_model(toy, tmp_path):
    """Each candidate's validation accuracy is measured, the best is kept (the one selection rule),
    test is never seen, and the saved model is the winner's own method with the table."""
    import numpy as np

    from conftest import make_color_folder
    from vlclassify.data import image_folder
    from vlclassify.errors import ConfigError, DataError
    from vlclassify.features import extract_features
    from vlclassify.methods import Encoded, create_method, load_method
    from vlclassify.metrics import score

    ds = image_folder(make_color_folder(tmp_path / "colors", per_class=6))["all"]
    enc = Encoded(ds, extract_features(toy, ds, views=("orig", "flip"), progress=False))
    y = ds.labels()
    tr = enc.subset([i for c in range(3) for i in np.flatnonzero(y == c)[:3]])
    va = enc.subset([i for c in range(3) for i in np.flatnonzero(y == c)[3:]])
    names = ["zero-shot", "linear-probe", "gda"]
    m = create_method("auto", toy, candidates=names, default="zero-shot")
    m.fit(tr, va)
    table = {r["method"]: r for r in m.fit_info["auto"]["table"]}
    assert list(table) == names
    for n in names:  # the table is each candidate fitted alone, scored on validation
        alone = create_method(n, toy)
        assert table[n]["val_accuracy"] == pytest.approx(
            score("single-label", va.dataset.labels(), alone.fit(tr, va).predict_proba(va))["accuracy"]
        )
    best = max(r["val_accuracy"] for r in table.values())
    chosen = m.fit_info["auto"]["method"]
    assert (
        table[chosen]["chosen"] and table[chosen]["val_accuracy"] == best and table["zero-shot"]["val_accuracy"] < best
    )
    m.save_pretrained(tmp_path / "model")
    again = load_method(tmp_path / "model", backbone=toy)
    assert again.name == chosen and again.fit_info["auto"]["table"] == m.fit_info["auto"]["table"]
    np.testing.assert_allclose(again.predict_proba(va), m.predict_proba(va), atol=1e-6)
    with pytest.raises(DataError, match="validation"):
        create_method("auto", toy, candidates=names).fit(tr)
    with pytest.raises(ConfigError, match="unknown candidate"):
        create_method("auto", toy, candidates=["gda", "nope"])


def test_fewshot_table_says_what_auto_kept():
    from vlclassify.fewshot import markdown_table, summarize

    runs = [
        {"method": m, "shots": k, "seed": s, "test_accuracy": a, "fit_seconds": 1.0, "fit_info": fi}
        for m, k, s, a, fi in [
            ("gda", 1, 1, 0.5, {}),
            ("auto", 1, 1, 0.5, {"auto": {"method": "gda"}}),
            ("auto", 1, 2, 0.4, {"auto": {"method": "linear-probe"}}),
            ("auto", 4, 1, 0.7, {"auto": {"method": "gda"}}),
        ]
    ]
    result = {"shots": [1, 4], "data": "d", "backbone": {"name": "toy"}, "seeds": [1, 2], "runs": runs}
    text = markdown_table({**result, "summary": summarize(runs)})
    assert "- 1-shot: gda 1, linear-probe 1" in text and "- 4-shot: gda 1" in text
