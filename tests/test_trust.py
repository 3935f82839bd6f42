"""Calibration and "unknown" (issue 22): the math on synthetic data whose answer is known."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlclassify.errors import ConfigError
from vlclassify.metrics import auroc, brier, calibration_report, ece, fpr_at_tpr, keep_threshold, nll
from vlclassify.trust import (
    Calibration,
    FeatureStats,
    OpenSetRule,
    choose_open_set,
    fit_calibration,
    fit_platt,
    fit_temperature,
    open_set_scores,
)


def softmax_data(t_true: float, n: int = 4000, c: int = 10, scale: float = 4.0, seed: int = 0):
    """Logits [n, c] and labels drawn from softmax(logits / t_true): the logits are over-confident
    by exactly t_true (> 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, scale, (n, c))
    p = torch.softmax(torch.from_numpy(z / t_true), -1).numpy()
    y = np.array([rng.choice(c, p=row) for row in p])
    return torch.from_numpy(z).float(), y


@pytest.mark.parametrize("t_true", [1.7, 3.0])
def test_temperature_recovers_the_true_one(t_true):
    z, y = softmax_data(t_true)
    t = fit_temperature(z, y)
    assert abs(t - t_true) / t_true < 0.10, (t, t_true)


def test_sigmoid_temperature_recovers_the_true_one():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 5, (3000, 6))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z / 2.5))).astype(np.float64)
    assert abs(fit_temperature(z, y, "sigmoid") - 2.5) / 2.5 < 0.10


def test_calibration_never_changes_the_argmax_and_lowers_nll():
    z, y = softmax_data(2.5, n=600, seed=3)
    cal = fit_calibration(z, y, "softmax")
    assert cal.kind == "temperature" and cal.source == "validation" and cal.temperature > 1.5
    raw = torch.softmax(z, -1).numpy()
    test = torch.randn(500, 10) * 7
    assert (cal.probs(test).argmax(-1) == test.argmax(-1).numpy()).all()
    assert cal.nll is not None and cal.nll_raw is not None and cal.nll < cal.nll_raw
    # the calibrated scores are calibrated: ECE falls from the over-confident raw scores
    assert ece(cal.probs(z), y) < 0.08 and ece(raw, y) > 0.15


def test_separable_validation_matches_the_laplace_smoothed_accuracy_and_says_so():
    z = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]] * 4)
    y = np.array([0, 1, 2] * 4)
    cal = fit_calibration(z, y, "softmax")
    assert "Laplace" in cal.note and cal.temperature > 0.05
    assert cal.probs(z).max(-1).mean() == pytest.approx(13 / 14, abs=1e-6)  # 12 of 12 right
    assert (cal.probs(z).argmax(-1) == y).all()


def test_platt_recovers_per_class_slopes_and_wins_when_classes_differ():
    rng = np.random.default_rng(2)
    a_true, b_true = np.array([0.3, 1.0, 2.5]), np.array([-1.0, 0.5, 0.0])
    z = rng.normal(0, 3, (4000, 3))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-(a_true * z + b_true)))).astype(np.float64)
    a, b = fit_platt(z, y)
    np.testing.assert_allclose(a, a_true, rtol=0.15)
    np.testing.assert_allclose(b, b_true, atol=0.15)
    cal = fit_calibration(z, y, "sigmoid")
    assert cal.kind == "platt" and cal.compared is not None and cal.compared["platt"] < cal.compared["temperature"]
    # one shared temperature explains data made with one: the simpler calibration is chosen
    y2 = (rng.random(z.shape) < 1 / (1 + np.exp(-z / 2))).astype(np.float64)
    cal2 = fit_calibration(z[:300], y2[:300], "sigmoid")
    assert cal2.kind == "temperature" and "out-of-fold" in cal2.note


def test_calibration_json_round_trip_and_errors():
    z, y = softmax_data(2.0, n=300)
    platt = Calibration("platt", "sigmoid", slope=[0.5, 2.0], intercept=[0.1, -0.3], source="validation")
    for cal, logits in ((fit_calibration(z, y, "softmax"), z), (platt, z[:, :2])):
        back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())), logits.shape[1])
        assert back == cal
        np.testing.assert_array_equal(back.probs(logits), cal.probs(logits))
    with pytest.raises(ConfigError, match=r"m/config.json: calibration\['label'\]: 2 Platt slopes for 3 classes"):
        Calibration.from_dict(
            {"kind": "platt", "activation": "sigmoid", "slope": [1, 1], "intercept": [0, 0]},
            3,
            "m/config.json: calibration['label']",
        )
    with pytest.raises(ConfigError, match="temperature must be a positive number"):
        Calibration.from_dict({"kind": "temperature", "temperature": -1.0}, 3)


def test_metrics_on_hand_computed_cases():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    y = np.array([0, 1, 1])
    assert nll(p, y) == pytest.approx(-(np.log(0.9) + np.log(0.4) + np.log(0.8)) / 3)
    assert brier(p, y) == pytest.approx((2 * 0.1**2 + 2 * 0.6**2 + 2 * 0.2**2) / 3)
    # bins: 0.9 (right), 0.6 (wrong), 0.8 (right): |1-0.9| + |0-0.6| + |1-0.8| over 3
    assert ece(p, y) == pytest.approx((0.1 + 0.6 + 0.2) / 3)
    assert ece(np.eye(2)[y], y) == 0.0 and brier(np.eye(2)[y], y) == 0.0
    r = calibration_report(p, y, raw=np.eye(2)[[0, 0, 0]])
    assert set(r) == {"ece", "nll", "brier", "ece_raw", "nll_raw", "brier_raw"} and r["ece_raw"] == pytest.approx(2 / 3)
    ym = np.array([[1, 0], [0, 1]])
    assert brier(np.array([[1.0, 0.5], [0.0, 1.0]]), ym) == pytest.approx(0.25 / 4)


def test_open_set_metrics():
    known, unknown = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.65, 0.1])
    assert auroc(known, unknown) == pytest.approx(7 / 8)
    assert keep_threshold(known, 0.75) == 0.7  # keeps 3 of 4
    assert fpr_at_tpr(known, unknown, 0.75) == 0.0 and fpr_at_tpr(known, unknown, 1.0) == 0.5


@pytest.mark.parametrize("keep", [0.95, 0.8, 0.5])
def test_threshold_keeps_the_target_share_of_validation_images(keep):
    scores = np.random.default_rng(0).normal(size=437)
    kept = float(np.mean(scores >= keep_threshold(scores, keep)))
    assert keep <= kept < keep + 1 / 437


def clusters(n_per: int, classes: int, dim: int = 32, seed: int = 0, centres=None):
    """Unit features around one random centre per class; logits = noisy cosine to the centres."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(classes, dim)) if centres is None else centres
    y = np.repeat(np.arange(classes), n_per)
    x = c[y] + 0.35 * rng.normal(size=(len(y), dim))
    return torch.from_numpy(x).float(), y, c


def test_feature_scores_find_unknowns_and_the_rule_keeps_95_percent_of_validation():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(5, 32))
    known_c = centres[:4]
    xtr, ytr, _ = clusters(8, 4, centres=known_c, seed=1)
    xva, yva, _ = clusters(10, 4, centres=known_c, seed=2)
    xte, _, _ = clusters(30, 4, centres=known_c, seed=3)
    xun = torch.from_numpy(centres[4] + 0.35 * rng.normal(size=(30, 32))).float()
    stats = FeatureStats.fit(xtr, ytr, 4)

    # a head that saw the known classes only: large logits for whatever it resembles most
    w = torch.from_numpy(known_c).float() * 3

    def head(x):
        return x @ w.T

    cal = fit_calibration(head(xva), yva, "softmax")
    rule = choose_open_set(head(xva), yva, cal, xva, stats, keep=0.95)
    assert rule.enabled and rule.source == "validation" and rule.heldout_auroc is not None
    assert rule.score in ("cosine", "mahalanobis")
    assert set(rule.heldout_auroc) == {"cosine", "mahalanobis", "max_prob", "energy"}
    val_scores = open_set_scores(head(xva), cal, xva, stats)
    assert np.mean(~rule.unknown(val_scores)) >= 0.95
    te, un = open_set_scores(head(xte), cal, xte, stats), open_set_scores(head(xun), cal, xun, stats)
    assert auroc(te[rule.score], un[rule.score]) > 0.95
    assert rule.unknown(un).mean() > 0.8


def test_no_validation_means_no_unknown_answer_and_the_rule_round_trips():
    cal = Calibration()
    off = choose_open_set(None, None, cal)
    assert not off.enabled and "without validation" in off.note
    assert not off.unknown({"max_prob": np.zeros(3)}).any()
    rule = OpenSetRule("cosine", 0.42, 0.9, "validation", "x", {"cosine": 0.99})
    assert OpenSetRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    with pytest.raises(ConfigError, match="config.json: open_set: not an open-set rule .*needs a finite threshold"):
        OpenSetRule.from_dict({"score": "cosine", "threshold": None}, "config.json: open_set")


def test_feature_stats_tensors_round_trip():
    x, y, _ = clusters(6, 3)
    s = FeatureStats.fit(x, y, 3)
    back = FeatureStats.from_tensors(s.tensors(), "m.safetensors")
    assert back is not None
    np.testing.assert_array_equal(back.cosine(x), s.cosine(x))
    assert FeatureStats.from_tensors({}, "m") is None
    with pytest.raises(ConfigError, match="m.safetensors: openset.means"):
        FeatureStats.from_tensors({"openset.means": s.means}, "m.safetensors")


def test_energy_is_temperature_aware():
    z = torch.tensor([[4.0, 1.0, 0.0]])
    cal = Calibration("temperature", temperature=2.0)
    assert open_set_scores(z, cal)["energy"][0] == pytest.approx(2.0 * float(torch.logsumexp(z / 2.0, -1)))


def test_reliability_diagram_is_a_png(tmp_path):
    from vlclassify.plots import reliability_diagram

    z, y = softmax_data(2.0, n=200)
    cal = fit_calibration(z, y, "softmax")
    path = reliability_diagram(
        {"calibrated": cal.probs(z), "raw": torch.softmax(z, -1).numpy()}, y, tmp_path / "rel.png", "t"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the fitted model: calibration and "unknown" through fit, predict, save/load, export and the CLI ----
TUX = ("animals", "food", "plants")


@pytest.fixture(scope="module")
def tux_parts():
    """Three Tux Paint categories: 6 training, 4 validation and 4 test photos each."""
    from dataclasses import replace

    from vlclassify.data import Dataset, tuxpaint

    ds = tuxpaint()["all"]
    keep = [ds.classnames.index(c) for c in TUX]
    by = {c: [it for it in ds.items if it.label == c] for c in keep}

    def part(lo, hi, name):
        items = [replace(it, label=k, tasks=None, text=None) for k, c in enumerate(keep) for it in by[c][lo:hi]]
        return Dataset(items=items, classnames=list(TUX), name=name)

    return part(0, 6, "train"), part(6, 10, "val"), part(10, 14, "test")


@pytest.fixture(scope="module")
def clothes(tmp_path_factory):
    """Ten Fashion-MNIST photos as PNG files: images of none of the Tux Paint classes."""
    from PIL import Image

    from vlclassify.data import fashion_mnist

    root = tmp_path_factory.mktemp("clothes")
    for i, it in enumerate(fashion_mnist()["test"].items[:10]):
        Image.fromarray(it.image.array).save(root / f"clothes_{i}.png")
    return root


@pytest.fixture(scope="module")
def fitted(effnet, tux_parts):
    from vlclassify.methods import create_method

    train, val, _ = tux_parts
    return create_method("linear-probe", effnet, C_grid=[1.0]).fit(train, val)


def test_fit_calibrates_on_validation_and_predict_answers_unknown_for_unrelated_photos(fitted, tux_parts, clothes):
    _, val, test = tux_parts
    cal, rule = fitted.calibration(), fitted.trust.open_set
    assert cal.kind == "temperature" and cal.source == "validation" and cal.temperature < 0.5  # under-confident probe
    assert rule.enabled and rule.keep == 0.95 and fitted.trust.feature == "pooled"
    # the rule keeps the target share of the validation images
    assert np.mean(~rule.unknown(fitted.open_set_scores(val))) >= 0.95
    # calibrated and raw scores rank the classes alike
    assert (fitted.predict_proba(test).argmax(-1) == fitted.predict_proba(test, calibrated=False).argmax(-1)).all()
    photos = sorted(str(p) for p in clothes.iterdir())
    answers = fitted.predict_results(photos)
    assert sum(r.unknown for r in answers) >= 7, [r.open_set for r in answers]
    first = next(r for r in answers if r.unknown).to_dict()
    assert first["unknown"] is True and first["labels"] == [] and first["uncertain"] is False
    assert first["open_set"]["score"] == rule.score and first["open_set"]["value"] < rule.threshold
    known = fitted.predict_results(test)
    assert sum(r.unknown for r in known) <= 3 and all(r.to_dict()["unknown"] is (not r.labels) for r in known)


def test_save_load_keeps_the_temperature_and_the_threshold(fitted, tux_parts, clothes, tmp_path):
    from vlclassify.methods import load_method

    _, _, test = tux_parts
    fitted.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["calibration"]["label"]["temperature"] == fitted.calibration().temperature
    assert cfg["open_set"]["threshold"] == fitted.trust.open_set.threshold
    again = load_method(tmp_path / "m")
    assert again.trust.open_set == fitted.trust.open_set and again.calibration() == fitted.calibration()
    np.testing.assert_array_equal(again.predict_proba(test), fitted.predict_proba(test))
    photos = sorted(str(p) for p in clothes.iterdir())
    for k, v in fitted.open_set_scores(photos).items():
        np.testing.assert_allclose(again.open_set_scores(photos)[k], v, rtol=1e-6)
    # a damaged calibration is named, with its file and field
    cfg["calibration"]["label"]["temperature"] = -2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: calibration\['label'\]: .*positive number"):
        load_method(tmp_path / "m")


def test_export_applies_the_calibration_and_outputs_the_open_set_score(fitted, clothes, tmp_path):
    import onnxruntime as ort

    from vlclassify.data import Item
    from vlclassify.data.decoder import decode
    from vlclassify.export import export_onnx

    photos = sorted(str(p) for p in clothes.iterdir())[:3]
    res = export_onnx(fitted, tmp_path / "m.onnx", check_images=photos)
    side = json.loads(res.sidecar.read_text())
    assert side["calibration"]["temperature"] == fitted.calibration().temperature
    assert side["outputs"]["open_set"]["unknown_below"] == fitted.trust.open_set.threshold
    pixels = torch.stack([fitted.backbone.preprocess(decode(Item(image=p))) for p in photos]).numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    probs, score = ort.InferenceSession(str(res.graph), so, providers=["CPUExecutionProvider"]).run(
        None, {"pixels": pixels}
    )
    np.testing.assert_allclose(probs, fitted.predict_proba(photos), atol=1e-4)
    raw = fitted.predict_proba(photos, calibrated=False)
    assert np.abs(probs - raw).max() > 1e-3  # the graph's scores are the calibrated ones, not the raw
    want = fitted.open_set_scores(photos)[fitted.trust.open_set.score]
    np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-4)


def test_fit_without_validation_never_answers_unknown_and_says_so(effnet, tux_parts, clothes):
    from vlclassify.methods import create_method

    train, _, _ = tux_parts
    m = create_method("linear-probe", effnet, C_grid=[1.0]).fit(train)
    assert m.calibration().kind == "none" and "no validation" in m.calibration().note
    assert not m.trust.open_set.enabled and "without validation" in m.trust.open_set.note
    assert not any(r.unknown for r in m.predict_results(sorted(str(p) for p in clothes.iterdir())))


def test_cli_fit_eval_unknown_and_predict(tux_parts, clothes, tmp_path):
    from typer.testing import CliRunner

    from vlclassify.cli import app

    rows = ["image,label,split"]
    for split, ds in zip(("train", "val", "test"), tux_parts, strict=True):
        rows += [f"{it.image.describe()},{ds.classnames[it.label]},{split}" for it in ds.items]
    (tmp_path / "tux.csv").write_text("\n".join(rows) + "\n")
    runner, out = CliRunner(), tmp_path / "model"
    fit = ["fit", "-m", "linear-probe", "-d", str(tmp_path / "tux.csv"), "-o", str(out), "--opt", "C_grid=[1.0]"]
    r = runner.invoke(app, [*fit, "--keep", "0.9"])
    assert r.exit_code == 0, r.output
    assert "calibration (label): temperature T = " in r.output and "keeps 90% of the known validation" in r.output
    r = runner.invoke(app, ["eval", str(out), "--unknown", str(clothes)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "eval-test.json").read_text())
    assert {"ece", "ece_raw", "nll", "brier"} <= set(rep) and 0 <= rep["ece"] <= 1
    assert set(rep["unknown"]["auroc"]) == {"cosine", "mahalanobis", "max_prob", "energy"}
    assert rep["unknown"]["chosen"] in rep["unknown"]["auroc"] and "<- chosen" in r.output
    assert rep["unknown"]["auroc"][rep["unknown"]["chosen"]] > 0.9
    assert (out / "reliability-test.png").read_bytes()[:4] == b"\x89PNG"
    photos = [str(p) for p in sorted(clothes.iterdir())]
    r = runner.invoke(app, ["predict", str(out), *photos])
    assert r.exit_code == 0, r.output
    assert sum(f"{p}: unknown  |" in r.output for p in photos) >= 7, r.output
    r = runner.invoke(app, ["predict", str(out), *photos, "--csv", str(tmp_path / "p.csv")])
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert sum(row["unknown"] == "1" for row in rows) >= 7 and all(
        row["decision"] == "" for row in rows if row["unknown"] == "1"
    )
    r = runner.invoke(app, ["predict", str(out), *photos, "--json"])
    answers = [json.loads(line) for line in r.output.strip().splitlines()]
    odd = [a for a in answers if a["unknown"]]
    assert len(odd) >= 7 and all(a["labels"] == [] and a["open_set"]["value"] < a["open_set"]["threshold"] for a in odd)


def test_the_service_answers_unknown_and_describes_its_rules(fitted, tux_parts, clothes):
    from starlette.testclient import TestClient

    from vlclassify.serve import create_app

    _, _, test = tux_parts
    photos = sorted(clothes.iterdir())
    with TestClient(create_app(fitted), base_url="http://127.0.0.1") as c:  # a served host (--allowed-hosts)
        info = c.get("/model").json()
        assert info["unknown"]["score"] == fitted.trust.open_set.score
        assert info["unknown"]["threshold"] == fitted.trust.open_set.threshold
        assert info["calibration"]["label"]["temperature"] == fitted.calibration().temperature
        answers = [c.post("/predict", content=p.read_bytes()).json() for p in photos]
        odd = [a for a in answers if a["unknown"]]
        assert len(odd) >= 7 and all(a["labels"] == [] and not a["uncertain"] for a in odd), answers
        known = c.post("/predict", content=Path(test.items[0].image.describe()).read_bytes()).json()
        assert known["unknown"] is False and known["labels"] and known["open_set"]["score"] == info["unknown"]["score"]


def test_one_image_per_class_gives_euclidean_mahalanobis():
    x, y, _ = clusters(1, 4)
    s = FeatureStats.fit(x, y, 4)
    np.testing.assert_allclose(s.precision.numpy(), np.eye(32), atol=1e-6)
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    np.testing.assert_allclose(s.mahalanobis(x.double()).numpy().max(-1), 0.0, atol=1e-6)  # each image is its mean
    assert np.isfinite(s.mahalanobis(unit[:2] * 3).numpy()).all()


def test_update_recalibrates_and_refits_the_class_means(effnet, tux_parts):
    from vlclassify.methods import create_method

    train, val, test = tux_parts
    from vlclassify.data import Dataset

    def first_two(ds):
        return Dataset(items=[it for it in ds.items if it.label < 2], classnames=list(TUX[:2]), name=ds.name)

    m = create_method("linear-probe", effnet, C_grid=[1.0])
    m.fit(first_two(train), first_two(val), keep=0.9)
    assert m.trust.stats is not None and m.trust.stats.means.shape[0] == 2
    m.update(train, val)  # the third class arrives with examples of every class
    assert m.classnames == list(TUX) and m.trust.stats is not None and m.trust.stats.means.shape[0] == 3
    assert m.trust.open_set.enabled and m.trust.open_set.keep == 0.9 and m.calibration().source == "validation"
    assert np.mean(~m.trust.open_set.unknown(m.open_set_scores(val))) >= 0.9
    assert len(m.predict_results(test)) == len(test)


def test_a_method_tagged_calibrated_keeps_t_1_and_says_so(effnet, tux_parts):
    from dataclasses import replace

    from vlclassify.methods.linear_probe import LinearProbe

    class SelfCalibrated(LinearProbe):
        tags = replace(LinearProbe.tags, calibrated=True)

    train, val, test = tux_parts
    m = SelfCalibrated(effnet, C_grid=[1.0]).fit(train, val)
    cal = m.calibration()
    assert cal.kind == "none" and cal.source == "method" and "T = 1" in cal.note
    np.testing.assert_allclose(m.predict_proba(test), m.predict_proba(test, calibrated=False))
    assert m.trust.open_set.enabled  # "unknown" is chosen on validation all the same
