"""The L-BFGS logistic solver minimises scikit-learn's LogisticRegression objective: same predictions,
close probabilities and weights, the same C picked on validation; binary, absent classes, one-vs-rest.
Speed is measured by benchmarks/speed/linear_probe.py, not here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from vlclassify.training.logistic import ABSENT_BIAS, fit_logistic, fit_logistic_path


def _data(n: int, f: int, k: int, seed: int = 0, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = rng.normal(size=(k, f)) * scale
    y = (x @ w.T + rng.gumbel(size=(n, k))).argmax(1)
    return x, y


def _sk(x, y, C):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=C, max_iter=10000, tol=1e-8).fit(x, y)


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("C", [0.1, 10.0, 1000.0])
def test_matches_sklearn(k, C):
    x, y = _data(400, 24, k)
    clf = _sk(x, y, C)
    W, b = fit_logistic(x, y, C, tol=1e-6)
    z = torch.from_numpy(x) @ W.T + b
    p = torch.softmax(z, -1).numpy()
    ref = clf.predict_proba(x)
    assert (p.argmax(1) == clf.predict(x)).mean() >= 0.995
    assert np.abs(p - ref).max() < 5e-3
    coef = clf.coef_ if k > 2 else np.stack([-clf.coef_[0], clf.coef_[0]]) / 2  # sklearn's binary row, as +-half
    assert np.abs(W.numpy() - coef).max() < 2e-2 * max(1.0, np.abs(coef).max())


@pytest.mark.parametrize("C", [0.1, 10.0])
def test_fewer_rows_than_features_matches_sklearn(C):
    """Few-shot shape (the solver then works in the rows' span): same probabilities and weights."""
    x, y = _data(30, 96, 5, seed=3)
    clf = _sk(x, y, C)
    W, b = fit_logistic(x, y, C, tol=1e-6)
    p = torch.softmax(torch.from_numpy(x) @ W.T + b, -1).numpy()
    assert np.abs(p - clf.predict_proba(x)).max() < 5e-3
    assert np.abs(W.numpy() - clf.coef_).max() < 2e-2 * max(1.0, np.abs(clf.coef_).max())


def test_absent_class_is_never_predicted():
    x, y = _data(300, 16, 4)
    y = np.where(y == 1, 0, y)  # class 1 has no example; class 4 is beyond the data
    W, b = fit_logistic(x, y, 1.0, num_classes=5)
    assert W.shape == (5, 16) and b[1] == ABSENT_BIAS and b[4] == ABSENT_BIAS and W[1].abs().sum() == 0
    assert set((torch.from_numpy(x) @ W.T + b).argmax(-1).tolist()) <= {0, 2, 3}
    clf = _sk(x, y, 1.0)  # the present classes are fitted as sklearn fits them
    assert np.abs(W.numpy()[[0, 2, 3]] - clf.coef_).max() < 2e-2


def test_one_vs_rest_multilabel_matches_sklearn():
    rng = np.random.default_rng(1)
    x, _ = _data(300, 20, 2)
    Y = (x @ rng.normal(size=(20, 4)) * 3 + rng.normal(size=(300, 4)) > 0).astype(np.float32)
    Y[:, 3] = 0  # a label that never occurs
    W, b = fit_logistic(x, Y, 5.0, multilabel=True, tol=1e-6)
    p = torch.sigmoid(torch.from_numpy(x) @ W.T + b).numpy()
    for j in range(3):
        ref = _sk(x, Y[:, j], 5.0).predict_proba(x)[:, 1]
        assert np.abs(p[:, j] - ref).max() < 5e-3
    assert np.all(p[:, 3] < 1e-6)


def test_path_is_warm_started_and_equals_cold_fits():
    x, y = _data(500, 32, 5, seed=2)
    Cs = [100.0, 0.1, 1.0, 10.0]  # any order; solved smallest first, returned as given
    path = fit_logistic_path(x, y, Cs, tol=1e-6)
    for C, (W, b) in zip(Cs, path):
        W0, b0 = fit_logistic(x, y, C, tol=1e-6)
        z, z0 = torch.from_numpy(x) @ W.T + b, torch.from_numpy(x) @ W0.T + b0
        assert torch.allclose(torch.softmax(z, -1), torch.softmax(z0, -1), atol=5e-3)


def test_same_C_chosen_on_validation_as_sklearn():
    x, y = _data(1200, 32, 4, seed=3, scale=2.0)
    xt, yt, xv, yv = x[:800], y[:800], x[800:], y[800:]
    Cs = [0.01, 0.1, 1.0, 10.0, 100.0]
    ours = [float(((xv @ W.numpy().T + b.numpy()).argmax(1) == yv).mean()) for W, b in fit_logistic_path(xt, yt, Cs)]
    ref = [float((_sk(xt, yt, C).predict(xv) == yv).mean()) for C in Cs]
    assert np.argmax(ours) == np.argmax(ref) and abs(max(ours) - max(ref)) <= 0.0025


def test_bad_input():
    with pytest.raises(ValueError, match="C must be > 0"):
        fit_logistic(np.zeros((3, 2), np.float32), np.array([0, 1, 0]), 0.0)
    W, b = fit_logistic(np.ones((3, 2), np.float32), np.array([2, 2, 2]), 1.0, num_classes=3)
    assert b.tolist() == [ABSENT_BIAS, ABSENT_BIAS, 0.0]  # one class only: it is always predicted
