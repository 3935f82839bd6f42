"""The library workflow under the CLI: one `score` for every headline number, `fit` / `evaluate` /
`predict` as functions, validation encoded once per fit, and the `--overwrite` guard."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlclassify.metrics import mean_average_precision, multilabel_report, score


def test_score_single_label_leaves_out_unlabelled_rows():
    y = np.array([0, 1, -1, 2])
    p = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    assert score("single-label", y, p) == {"accuracy": pytest.approx(2 / 3)}
    assert math.isnan(score("single-label", np.array([-1, -1]), p[:2])["accuracy"])


def test_score_multi_label_is_map_and_micro_f1_at_the_thresholds():
    rng = np.random.default_rng(0)
    y = (rng.random((20, 4)) > 0.5).astype(np.float32)
    p = rng.random((20, 4))
    assert score("multi-label", y, p) == {"mAP": mean_average_precision(y, p)}
    thr = [0.3, 0.5, None, 0.7]
    s = score("multi-label", y, p, thresholds=thr)
    assert list(s) == ["mAP", "micro-F1"]
    assert s["micro-F1"] == multilabel_report(y, p, list("abcd"), thr)["micro_f1"]
    assert s["micro-F1"] != score("multi-label", y, p, thresholds=0.5)["micro-F1"]


def test_score_multi_task_means_the_tasks_with_a_label():
    targets = {"colour": np.array([0, 1, 1]), "shape": np.array([-1, -1, -1]), "size": np.array([1, 0, 1])}
    probs = {t: np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]) for t in targets}
    s = score("multi-task", targets, probs)
    assert s == {"accuracy": pytest.approx(1 / 3), "accuracy/colour": pytest.approx(2 / 3), "accuracy/size": 0.0}


def test_score_names_an_unknown_kind():
    with pytest.raises(ValueError, match="multi-task"):
        score("ranking", np.zeros(2), np.zeros((2, 2)))
