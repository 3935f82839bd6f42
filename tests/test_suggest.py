"""`vlclassify suggest`: the strategies' picks, determinism, and what is never suggested."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_color_folder
from vlclassify.cli import app
from vlclassify.errors import ConfigError
from vlclassify.suggest import auto_strategy, choose, kmeans, uncertainty


def blobs(sizes=(60, 30, 10), dim=8, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs of the given sizes on unit directions -> (x [N, dim], blob [N])."""
    rng = np.random.default_rng(seed)
    x, y = [], []
    for b, n in enumerate(sizes):
        centre = np.zeros(dim)
        centre[b] = 5.0
        x.append(centre + rng.normal(0, 0.3, (n, dim)))
        y += [b] * n
    return np.concatenate(x), np.array(y)


def test_typical_covers_every_cluster_and_picks_central_images():
    x, y = blobs()
    picks = choose(x, np.zeros(len(x), bool), 3, "typical", seed=1)
    assert sorted(y[picks]) == [0, 1, 2]  # one image of each blob, the largest blob first
    assert y[picks[0]] == 0
    for i in picks:  # the most typical: nearer its blob's centre than the blob's median image
        d = np.linalg.norm(x[y == y[i]] - x[y == y[i]].mean(0), axis=1)
        assert np.linalg.norm(x[i] - x[y == y[i]].mean(0)) <= np.median(d)


def test_typical_goes_to_uncovered_clusters_first():
    x, y = blobs()
    labelled = np.zeros(len(x), bool)
    labelled[np.flatnonzero(y == 0)[:1]] = True  # blob 0 already has a label
    picks = choose(x, labelled, 2, "typical", seed=1)
    assert sorted(y[picks]) == [1, 2]


def test_coreset_spreads_over_the_blobs():
    x, y = blobs()
    labelled = np.zeros(len(x), bool)
    labelled[0] = True
    assert sorted(y[choose(x, labelled, 2, "coreset", seed=3)]) == [1, 2]


def test_margin_takes_uncertain_images_but_not_near_copies():
    x, y = blobs(sizes=(50, 50))
    probs = np.tile([0.95, 0.05], (len(x), 1))
    doubt = np.flatnonzero(y == 0)[:5].tolist() + np.flatnonzero(y == 1)[:1].tolist()
    probs[doubt] = [0.5, 0.5]  # five doubtful images in blob 0, one in blob 1
    picks = choose(x, np.zeros(len(x), bool), 2, "margin", probs, seed=1)
    assert set(picks) <= set(doubt) and sorted(y[picks]) == [0, 1]  # one per blob, not two copies of blob 0
    assert uncertainty(probs, "margin")[doubt[0]] == pytest.approx(1.0)
    ent = uncertainty(probs, "entropy")
    assert ent[doubt[0]] > ent[np.flatnonzero(y == 1)[5]]


def test_choose_is_deterministic_and_never_repeats_a_labelled_row():
    x, _ = blobs()
    rng = np.random.default_rng(5)
    labelled = rng.random(len(x)) < 0.3
    probs = rng.dirichlet(np.ones(4), len(x))
    for s in ("typical", "coreset", "random", "margin", "entropy"):
        a = choose(x, labelled, 12, s, probs, seed=7)
        assert a == choose(x, labelled, 12, s, probs, seed=7), s
        assert len(set(a)) == 12 and not labelled[a].any(), s
    assert choose(x, labelled, 12, "random", seed=7) != choose(x, labelled, 12, "random", seed=8)
    everything_but_two = np.ones(len(x), bool)
    everything_but_two[[4, 9]] = False
    assert sorted(choose(x, everything_but_two, 5, "typical", seed=1)) == [4, 9]
    with pytest.raises(ConfigError, match="give a model"):
        choose(x, labelled, 3, "margin", None)


def test_kmeans_finds_the_blobs():
    x, y = blobs()
    assign = kmeans(x, 3, np.random.default_rng(0))
    assert len({(a, b) for a, b in zip(assign, y)}) == 3  # each cluster is one blob


def test_auto_starts_typical_then_follows_the_model():
    assert auto_strategy(0, 10, False) == "typical"
    assert auto_strategy(100, 10, False) == "typical"  # a names-only model learnt nothing from images
    assert auto_strategy(5, 10, True) == "typical"
    assert auto_strategy(40, 10, True) == "margin"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_suggest_is_deterministic_and_skips_labelled_images(tmp_path):
    pool = make_color_folder(tmp_path / "pool", per_class=6)
    files = sorted(str(p.resolve()) for p in pool.rglob("*.png"))
    (tmp_path / "labels.csv").write_text(
        "image,label\n" + "".join(f"{f},{Path(f).parent.name}\n" for f in files[:5]), encoding="utf-8"
    )
    run = CliRunner()
    args = ["suggest", "--pool", str(pool), "-n", "8", "--backbone", "toy", "--cache-dir", str(tmp_path / "c")]
    for out, extra in (("a.csv", []), ("b.csv", []), ("c.csv", ["--exclude", str(tmp_path / "labels.csv")])):
        r = run.invoke(app, [*args, "--out", str(tmp_path / out), *extra])
        assert r.exit_code == 0, r.output
    a, b, c = (_rows(tmp_path / n) for n in ("a.csv", "b.csv", "c.csv"))
    assert a == b and len(a) == 8 and list(a[0]) == ["image", "strategy"]
    assert {r["strategy"] for r in a} == {"typical"}
    assert len({r["image"] for r in c}) == 8 and not {r["image"] for r in c} & set(files[:5])
    assert {r["image"] for r in c} <= set(files)


def test_cli_suggest_with_a_model_never_suggests_its_training_images(tmp_path):
    pool = make_color_folder(tmp_path / "pool", per_class=6)
    run = CliRunner()
    cache = ["--cache-dir", str(tmp_path / "c")]
    r = run.invoke(
        app,
        ["fit", "-m", "linear-probe", "-d", str(pool), "--shots", "2", "-b", "toy", "-o", str(tmp_path / "m"), *cache],
    )
    assert r.exit_code == 0, r.output
    import json

    split = json.loads((tmp_path / "m" / "split.json").read_text())
    trained = {str((pool / row[0]).resolve()) for row in split["train"] + split["val"]}
    assert trained
    out = tmp_path / "s.csv"
    r = run.invoke(
        app,
        [
            "suggest",
            "--pool",
            str(pool),
            "--model",
            str(tmp_path / "m"),
            "-n",
            "30",
            "--strategy",
            "margin",
            "--out",
            str(out),
            *cache,
        ],
    )
    assert r.exit_code == 0, r.output
    rows = _rows(out)
    assert list(rows[0]) == ["image", "guess", "score", "strategy"]
    assert len(rows) == 18 - len(trained) and not {r["image"] for r in rows} & trained
    assert all(r["guess"] in ("blue", "green", "red") and 0 < float(r["score"]) <= 1 for r in rows)
    margins = [1 - float(r["score"]) for r in rows]  # best first: the most doubtful (lowest top score) lead
    assert margins[0] >= np.median(margins)
