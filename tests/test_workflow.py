"""The library workflow under the CLI: one `score` for every headline number, `fit` / `evaluate` /
`predict` as functions, validation encoded once per fit, and the `--overwrite` guard."""

from __future__ import annotations

import math
import warnings

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


# ---- the workflow -------------------------------------------------------------------------------
def test_a_fit_encodes_its_validation_images_once(color_folder, toy, cache, monkeypatch):
    """Before the workflow, `Method.fit` encoded val and the CLI's scores encoded it again (2 -> 1)."""
    import vlclassify.methods.base as base
    from vlclassify import workflow
    from vlclassify.context import RunContext

    seen: list[list[str]] = []
    extract = base.extract_features

    def counting(backbone, data, *args, **kwargs):
        seen.append([it.key for it in data.items])
        return extract(backbone, data, *args, **kwargs)

    monkeypatch.setattr(base, "extract_features", counting)
    for method in ("linear-probe", "zero-shot"):
        seen.clear()
        r = workflow.fit(
            str(color_folder), method, backbone=toy, val_fraction=0.34, test_fraction=0.33, ctx=RunContext(cache=cache)
        )
        val = [it.key for it in r.splits["val"].items]
        assert seen.count(val) == 1, (method, seen)
        assert set(r.validation) == {"accuracy"} and r.info["validation"] == r.validation
        assert r.validation == workflow.validation_scores(r.model, r.splits["val"], RunContext(cache=cache))


def test_fit_evaluate_predict_as_library_calls(color_folder, toy, cache, tmp_path):
    from vlclassify import workflow
    from vlclassify.context import RunContext
    from vlclassify.methods import load_method

    ctx = RunContext(cache=cache, progress=False)
    r = workflow.fit(str(color_folder), "linear-probe", backbone=toy, val_fraction=0.34, test_fraction=0.33, ctx=ctx)
    assert r.info["sizes"] == {k: len(v) for k, v in r.splits.items()} and r.info["data"] == str(color_folder)
    out = r.save(tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "fit.json", "model.safetensors", "split.json"]
    ds, spec = workflow.eval_data(out)
    assert [it.key for it in ds.items] == [it.key for it in r.splits["test"].items]  # the fit's own test items
    m = load_method(out)
    rep = workflow.evaluate(m, ds, spec=spec, ctx=ctx)
    assert rep.metrics["top1"] == 1.0 and rep.headline[:2] == ("n", "top1") and not rep.tasks
    paths = rep.save(out / "eval-test.json")
    assert [p.name for p in paths] == ["eval-test.json", "predictions-test.csv"]
    img = sorted((color_folder / "red").iterdir())[0]
    [pred] = workflow.predict(m, [str(img)], top=2, ctx=ctx)
    assert pred.labels == ["red"] and len(pred.scores) == 2


# ---- the --overwrite guard ----------------------------------------------------------------------
@pytest.fixture
def model_folder(color_folder, toy, cache, tmp_path):
    from vlclassify import workflow
    from vlclassify.context import RunContext

    r = workflow.fit(str(color_folder), "zero-shot", backbone=toy, ctx=RunContext(cache=cache, progress=False))
    return r.save(tmp_path / "model")


def test_overwrite_replaces_only_a_vlclassify_model_folder(model_folder, tmp_path):
    from vlclassify.errors import DataError
    from vlclassify.utils import check_overwrite

    assert check_overwrite(tmp_path / "new", False) == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    check_overwrite(tmp_path / "empty", False)
    with pytest.raises(DataError, match="not empty; pass --overwrite"):
        check_overwrite(model_folder, False)
    (model_folder / "eval-test.json").write_text("{}")  # what eval writes there is the model's too
    (model_folder / "plots-test").mkdir()
    assert check_overwrite(model_folder, True) == model_folder
    (model_folder / "holiday.jpg").write_bytes(b"a user's photo")
    with pytest.raises(DataError, match="holds holiday.jpg, which vlclassify did not write"):
        check_overwrite(model_folder, True)


@pytest.mark.parametrize("target", ["data", "parent", "cwd", "home", "root", "files", "fake-model", "file"])
def test_overwrite_refuses_every_dangerous_target(target, color_folder, tmp_path, monkeypatch):
    from pathlib import Path

    from vlclassify.errors import DataError
    from vlclassify.utils import check_overwrite

    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "letter.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "docs")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "config.json").write_text('{"a": 1}')
    (tmp_path / "fake" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"a photo")
    out, why = {
        "data": (color_folder, "is the data being read"),
        "parent": (color_folder.parent, "a folder holding the data being read"),
        "cwd": (Path("."), "is the current directory"),
        "home": (home, "your home folder"),
        "root": (Path("/"), "the file-system root"),
        "files": (tmp_path / "photos", "not a vlclassify model folder"),
        "fake-model": (tmp_path / "fake", "not a vlclassify model folder"),
        "file": (tmp_path / "f.txt", "is a file"),
    }[target]
    with pytest.raises(DataError, match=why) as e:
        check_overwrite(out, True, reads=[str(color_folder / "red") if target == "parent" else str(color_folder)])
    assert "\n" not in str(e.value)
    assert (home / "docs" / "letter.txt").exists() and (tmp_path / "photos" / "a.jpg").exists()
    assert len(list((color_folder / "red").iterdir())) == 6


def test_evaluate_on_a_subset_of_the_models_classes_and_a_class_it_lacks(toy, tmp_path):
    """A folder holding some of the model's classes is scored under the model's class indices;
    a class the model does not know is one line naming it (it was refused without saying how)."""
    import shutil

    from conftest import make_color_folder
    from vlclassify import workflow
    from vlclassify.context import RunContext
    from vlclassify.data import load_data, train_val_test
    from vlclassify.errors import DataError
    from vlclassify.methods import create_method

    root = make_color_folder(tmp_path / "colors")
    splits = train_val_test(load_data(str(root)), seed=0)
    ctx = RunContext(progress=False)
    m = create_method("linear-probe", toy).fit(splits["train"], splits["val"], ctx=ctx)
    sub = tmp_path / "sub"
    for c in ("blue", "red"):
        shutil.copytree(root / c, sub / c)
    data = load_data(str(sub))["all"]
    rep = workflow.evaluate(m, data, ctx=ctx)
    truth = {t for t in rep.truth}
    assert truth == {"blue", "red"} and len(rep.predictions) == len(data)
    whole = m.predict_proba(load_data(str(root))["all"], ctx=ctx)
    assert rep.probs.shape == (len(data), 3) and whole.shape[1] == 3  # the model's three classes
    (sub / "blue").rename(sub / "purple")
    with pytest.raises(DataError, match=r"class\(es\) purple are not among the model's"):
        workflow.evaluate(m, load_data(str(sub))["all"], ctx=ctx)


def test_eval_says_when_the_test_split_changed_since_the_fit(toy, tmp_path):
    """A test image deleted after the fit was scored quietly as one image fewer."""
    from conftest import make_color_folder
    from vlclassify import workflow
    from vlclassify.context import RunContext

    root = make_color_folder(tmp_path / "colors")
    result = workflow.fit(str(root), "linear-probe", backbone=toy, ctx=RunContext(progress=False))
    result.save(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged data: no word
        ds, _ = workflow.eval_data(tmp_path / "m")
    victim = ds.items[0].image.describe()
    import os

    os.remove(victim)
    with pytest.warns(UserWarning, match=r"the test split has \d+ image\(s\), \d+ at fit time"):
        workflow.eval_data(tmp_path / "m")
