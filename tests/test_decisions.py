"""Decision rules chosen on validation: argmax, a target precision, multi-label thresholds."""

import numpy as np
import pytest

from vlclassify.errors import ConfigError
from vlclassify.methods.decision import MIN_EVIDENCE, DecisionRule, choose_rule, task_prediction


def test_argmax_and_round_trip():
    rule = choose_rule(np.eye(3), np.arange(3), multilabel=False, num_classes=3)
    assert rule.kind == "argmax" and rule.apply(np.array([[0.2, 0.5, 0.3]])).tolist() == [1]
    again = DecisionRule.from_dict(rule.to_dict(), 3)
    assert again == rule
    with pytest.raises(ConfigError, match="2 thresholds for 3 classes"):
        DecisionRule.from_dict({"kind": "thresholds", "thresholds": [0.5, 0.5]}, 3)
    with pytest.raises(ConfigError, match="decision kind"):
        DecisionRule("vote")


def test_precision_target_gives_uncertain_below_the_class_threshold():
    rng = np.random.default_rng(0)
    n = 4 * MIN_EVIDENCE
    conf = rng.uniform(0.4, 1.0, n)
    y = np.zeros(n, dtype=int)
    y[conf < 0.7] = 1  # class-0 predictions are right only when confident
    probs = np.stack([conf, 1 - conf], 1)
    rule = choose_rule(probs, y, multilabel=False, num_classes=2, precision=0.9)
    assert rule.kind == "precision" and rule.per_class == 1  # class 1 is never predicted: global threshold
    t0 = rule.thresholds[0]
    assert 0.6 <= t0 <= 0.75
    out = rule.apply(np.array([[0.95, 0.05], [0.55, 0.45]]))
    assert out.tolist() == [0, -1]
    accepted = probs[:, 0] >= t0
    assert (y[accepted] == 0).mean() >= 0.9
    # no validation data: nothing can be shown to reach the target, every answer is uncertain
    blind = choose_rule(None, None, multilabel=False, num_classes=2, precision=0.9)
    assert blind.apply(probs).tolist() == [-1] * n and "uncertain" in blind.note


def test_multilabel_thresholds_per_class_and_global():
    rng = np.random.default_rng(1)
    y = (rng.uniform(size=(200, 2)) < 0.4).astype(float)
    p = np.where(y == 1, 0.6, 0.3) + rng.normal(0, 0.05, y.shape)
    p[:, 1] = np.where(y[:, 1] == 1, 0.15, 0.03) + rng.normal(0, 0.01, 200)  # a class with small scores
    per = choose_rule(p, y, multilabel=True, num_classes=2)
    glob = choose_rule(p, y, multilabel=True, num_classes=2, per_class=False)
    g = glob.thresholds[0]
    assert len(set(glob.thresholds)) == 1 and glob.per_class == 0 and 0.1 < g < 0.35
    # per class: each class's best F1 threshold, shrunk halfway to the global one
    assert per.per_class == 2 and per.thresholds[0] > g >= per.thresholds[1]
    assert 0.35 < 2 * per.thresholds[0] - g < 0.55 and 0.03 < 2 * per.thresholds[1] - g <= 0.15

    def f1(pred):
        tp = (pred * y).sum()
        return 2 * tp / (pred.sum() + y.sum())

    assert f1(per.apply(p)) > f1(glob.apply(p)) + 0.05  # the class-specific part helps when scales differ
    both = np.array([0.2, 0.7])
    r = task_prediction(both, np.array([True, True]), ["a", "b"], top=1)
    assert r.labels == ["b", "a"] and r.scores == [("b", 0.7)] and not r.uncertain  # found labels, best first


def test_multilabel_class_without_validation_positive_uses_the_global_threshold():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    p = np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.1], [0.2, 0.2]])
    rule = choose_rule(p, y, multilabel=True, num_classes=2)
    glob = choose_rule(p, y, multilabel=True, num_classes=2, per_class=False).thresholds[0]
    assert rule.per_class == 1 and rule.thresholds[1] == glob and "global" in rule.note
