"""The method contract, over every registered method (timm's one-test-for-every-model habit).

For each method x data kind (single-label, multi-label, image + text, two tasks) on the toy
backbone: fit, predict_proba, predict (decisions), predict_results, save_pretrained, load_method
and identical outputs after the round trip — or, for a kind the method does not take, the
one-line refusal before any feature is extracted. A new method is covered the moment it is
registered: FAST only shortens budgets, a method missing from it runs with its defaults.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from vlclassify.data import load_data
from vlclassify.errors import VLClassifyError
from vlclassify.methods import create_method, list_methods, load_method
from vlclassify.methods.base import MULTI, SINGLE, TASKS, TEXT

FAST = {  # shorter budgets for a quick suite; every other option is the method's default
    "cmm": {"steps": 40},
    "vt-clip": {"steps": 12, "eval_every": 4},
    "tip-adapter-f": {"epochs": 3},
    "lp++": {"epochs": 20},
    "auto": {"candidates": ["zero-shot", "gda", "lp++"], "options": {"lp++": {"epochs": 20}}},
    "cross-modal-linear-probe": {"steps": 12, "eval_every": 4},
    "cma-clip": {"frozen_epochs": 2, "e2e_epochs": 1, "tune_epochs": 1, "width": 32, "head_hidden": 16},
    "dicls": {"epochs": 2, "dim": 16},
    "icar": {"image_epochs": 1, "joint_epochs": 1, "min_steps_per_epoch": 2},
}
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHADES = {"red": "warm", "green": "cold", "blue": "cold"}
KIND_NAMES = ("single", "multi", "text", "tasks")


def _image(path, left, right=None, seed=0):
    rng = np.random.default_rng(seed)
    arr = np.zeros((24, 24, 3), dtype=np.float64)
    arr[:, :12] = COLORS[left]
    arr[:, 12:] = COLORS[right or left]
    Image.fromarray(np.clip(arr + rng.normal(0, 15, arr.shape), 0, 255).astype(np.uint8)).save(path)


def write_manifest(root, kind: str):
    """A small CSV of the kind: 3 colours, 8 images each (train 4 / val 2 / test 2)."""
    root.mkdir(parents=True, exist_ok=True)
    rows, names = [], list(COLORS)
    for ci, c in enumerate(names):
        for i in range(8):
            split = "train" if i < 4 else ("val" if i < 6 else "test")
            p = root / f"{c}_{i}.png"
            if kind == "multi":
                other = names[(ci + 1 + i % 2) % 3]
                _image(p, c, other if i % 3 else None, seed=ci * 10 + i)
                labels = sorted({c, other}) if i % 3 else [c]
                rows.append({"image": p.name, "labels": ",".join(labels), "split": split})
            else:
                _image(p, c, seed=ci * 10 + i)
                row = {"image": p.name, "split": split}
                if kind == "tasks":
                    row.update({"color": c, "shade": SHADES[c]})
                else:
                    row["label"] = c
                if kind == "text":
                    row["text"] = f"a {c} square" if i % 4 else "a square"
                rows.append(row)
    path = root / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {k: load_data(str(write_manifest(root / k, k))) for k in KIND_NAMES}


def make(name, toy, cache, **extra):
    m = create_method(name, toy, **{**FAST.get(name, {}), **extra})
    return m


def _refuses(m, ds) -> bool:
    return (MULTI if ds.multilabel else SINGLE) not in m.takes()


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("name", list_methods())
def test_every_method_takes_or_refuses_every_kind(name, kind, toy, cache, datasets, tmp_path, monkeypatch):
    splits = datasets[kind]
    train, val, test = splits["train"], splits["val"], splits["test"]
    m = make(name, toy, cache)
    if _refuses(m, train):
        calls = []
        monkeypatch.setattr(toy, "preprocess", lambda im: calls.append(1))  # any extraction decodes images
        with pytest.raises(VLClassifyError) as err:
            m.fit(train, val)
        msg = str(err.value)
        assert "\n" not in msg and "does not take" in msg and calls == [], msg
        assert all(
            other in msg
            for other in list_methods()
            if (MULTI if train.multilabel else SINGLE) in type(create_method(other, toy)).kinds
        )
        return
    m.fit(train, val)
    assert m.head is not None and isinstance(m.head, torch.nn.Module)
    C = train.num_classes
    p = m.predict_proba(test)
    assert p.shape == (len(test), C) and np.isfinite(p).all()
    if not m.multilabel:
        assert np.allclose(p.sum(1), 1, atol=1e-5)
    decided = m.predict(test)
    assert decided.shape == ((len(test), C) if m.multilabel else (len(test),))
    results = m.predict_results(test, top=2)
    assert len(results) == len(test)
    r = results[0]
    assert list(r.tasks)[0] == m.task_name("label") and len(r.scores) == 2 and r.scores[0][1] >= r.scores[1][1]
    assert r.to_dict()["scores"][0]["label"] in train.classnames
    if TASKS in m.takes() and kind == "tasks":
        main = next(t for t in train.tasks if train.tasks[t] == train.classnames)  # the column of the main label
        assert set(r.tasks) == {main, *[t for t in train.tasks if t != main]}
        assert {m.task_name(t) for t in m.decisions} == set(r.tasks)
    if kind == "tasks" and TASKS not in m.takes():
        assert "shade" in " ".join(m.fit_info.get("ignored", []))
    if kind == "text" and TEXT not in m.takes():
        assert "texts are ignored" in " ".join(m.fit_info.get("ignored", []))
    m.save_pretrained(tmp_path / "model")
    again = load_method(tmp_path / "model", backbone=toy)
    np.testing.assert_allclose(again.predict_proba(test), p, atol=1e-6)
    np.testing.assert_array_equal(again.predict(test), decided)
    assert [x.to_dict() for x in again.predict_results(test, top=2)] == [x.to_dict() for x in results]


@pytest.mark.parametrize("name", list_methods())
def test_every_method_declares_its_contract(name, toy):
    cls = type(create_method(name, toy))
    from vlclassify.methods.base import FEATURES, KINDS

    assert cls.kinds and cls.kinds <= set(KINDS) and (SINGLE in cls.kinds or MULTI in cls.kinds)
    assert cls.needs and cls.needs <= set(FEATURES)
    assert (cls.__doc__ or "").strip(), "a one-line description for `vlclassify methods`"


def _trains(name: str) -> bool:
    """A method trains (declares stages) when it overrides Method.stages."""
    from vlclassify.methods import METHODS
    from vlclassify.methods.base import Method

    return METHODS.get(name).stages is not Method.stages


TRAINABLE = [n for n in list_methods() if _trains(n)]


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_trainable_method_resumes_after_a_kill(name, toy, cache, datasets, tmp_path, monkeypatch):
    from vlclassify.training import Trainer

    train, val, test = (datasets["single"][s] for s in ("train", "val", "test"))
    ref = make(name, toy, cache, run_dir=str(tmp_path / "ref")).fit(train, val)

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed  # the first finished round of the first training run: as if the process died there

    real_init = Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.callbacks.append(kill)

    monkeypatch.setattr(Trainer, "__init__", init)
    with pytest.raises(Killed):
        make(name, toy, cache, run_dir=str(tmp_path / "run")).fit(train, val)
    monkeypatch.setattr(Trainer, "__init__", real_init)
    again = make(name, toy, cache, run_dir=str(tmp_path / "run")).fit(train, val)
    np.testing.assert_allclose(again.predict_proba(test), ref.predict_proba(test), atol=1e-6)


def test_every_trainable_method_under_torchrun_matches_one_process(datasets, tmp_path):
    """2 processes (CPU, gloo), the same global batch split across them: the same validation accuracy
    as one process, and scores within 0.02 (the ranks' partial means are summed in another order,
    and a batch whose rows do not split evenly weighs its halves slightly differently)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("ddp_fit.py")
    manifest = write_manifest(tmp_path / "data", "single")
    env = {**os.environ, "VLCLASSIFY_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    opts = json.dumps({n: FAST.get(n, {}) for n in TRAINABLE})
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(script), str(manifest), opts, str(one)], check=True, env=env, timeout=600)
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(manifest), opts, str(two)],
        check=True,
        env=env,
        timeout=600,
    )
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert set(a) == set(b) == set(TRAINABLE)
    for name in TRAINABLE:
        assert b[name]["world"] == 2 and a[name]["world"] == 1
        assert abs(a[name]["val_accuracy"] - b[name]["val_accuracy"]) <= 1e-9, name
        assert np.abs(np.array(a[name]["probs"]) - np.array(b[name]["probs"])).max() < 0.02, name


def test_the_contract_page_is_generated_from_the_declarations():
    from pathlib import Path

    from vlclassify.methods.registry import contract_table

    page = (Path(__file__).parent.parent / "docs" / "methods.md").read_text()
    start = page.index("<!-- contract table")
    table = page[page.index("\n", start) + 1 : page.index("<!-- end of the contract table")]
    assert table.strip() == contract_table().strip(), "regenerate docs/methods.md: vlclassify methods --contract"
