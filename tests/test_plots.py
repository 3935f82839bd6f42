"""Figures for 30 classes: written, sized to their content, legends outside the axes, every task drawn."""

import numpy as np
import pytest
from PIL import Image

from vlclassify.data import Dataset, Item
from vlclassify.plots import (
    TaskScores,
    alignment_matrix,
    report,
    roc_pr_curves,
    save_heatmap,
    tsne_features,
    write_eval_plots,
)
from vlclassify.plots import multilabel as ml

C = 30
NAMES = [f"class-{i:02d}" for i in range(C)]


@pytest.fixture(scope="module")
def multilabel_data():
    """[N, 30] labels with a long tail (class c has ~ 1/(c+1) of the positives) and scores that track them."""
    rng = np.random.default_rng(0)
    n = 240
    p = 0.6 / (1 + np.arange(C)) + 0.02
    y = (rng.random((n, C)) < p).astype(np.float32)
    y[y.sum(1) == 0, 0] = 1
    y[:5, 29] = 0  # class 29 gets no positives at all: not scored
    probs = np.clip(0.6 * y + rng.normal(0.2, 0.2, y.shape), 0, 1).astype(np.float32)
    return y, probs


def png_size(path):
    assert path.is_file() and path.stat().st_size > 10_000
    with Image.open(path) as im:
        return im.size


def legend_outside(fig, ax) -> bool:
    fig.canvas.draw()
    leg = ax.get_legend() or fig.axes[-1].get_legend()
    return leg.get_window_extent().x0 >= ax.get_window_extent().x1


def test_roc_pr_with_30_classes_colours_the_top_10_outside_the_axes(tmp_path, multilabel_data):
    y, probs = multilabel_data
    y = y.copy()
    y[:, 29] = 0
    fig = ml._roc_pr_figure(y, probs, NAMES)
    ax_roc, ax_pr = fig.axes
    labels = [t.get_text() for t in ax_pr.get_legend().get_texts()]
    assert len(labels) == 10 and labels[0].startswith("class-00 (n=")  # most positives first
    assert legend_outside(fig, ax_pr)
    assert len(ax_roc.lines) == 29 + 1  # 29 scored classes + the chance diagonal
    note = " ".join(fig.texts[-1].get_text().split())
    assert "29 of 30 classes scored (1 have no positives" in note and "grey: the other 19" in note
    ml._plt().close(fig)
    w, h = png_size(roc_pr_curves(y, probs, NAMES, tmp_path / "roc_pr.png", title="30 classes"))
    assert 1300 < w < 2200 and 550 < h < 900


def test_tsne_multilabel_caption_explains_the_colours(tmp_path, multilabel_data):
    y, _ = multilabel_data
    rng = np.random.default_rng(1)
    plain = rng.normal(size=(len(y), 16)) + y[:, :16]
    fused = rng.normal(size=(len(y), 8)) + 2 * y[:, :8]
    fig = ml._tsne_figure(plain, fused, y, NAMES, seed=0, max_points=len(y), title="", max_classes=10)
    note = " ".join(fig.texts[-1].get_text().split())
    assert "rarest label among the 10 most frequent classes" in note and "Marker: how many labels" in note
    texts = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert texts[:10] == [NAMES[c] for c in ml.top_classes(y, 10)] and "other classes" in texts and "2 labels" in texts
    assert legend_outside(fig, fig.axes[1])
    assert f"{len(y)} images" in fig.axes[0].get_title()
    ml._plt().close(fig)
    w, h = png_size(tsne_features(plain, fused, y, NAMES, tmp_path / "tsne.png", max_points=120))
    assert 1300 < w < 2200 and 600 < h < 1000


def test_colour_is_the_rarest_label_among_the_top_classes():
    y = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], dtype=float)
    top = ml.top_classes(y, 2)  # supports 2, 4, 1, 1 -> classes 1, 0
    assert top.tolist() == [1, 0]
    assert ml._colour_by(y, top).tolist() == [0, 1, -1, 0, 1, 1]


def test_alignment_figure_is_sized_to_its_tokens(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {}
    for L in (20, 80):
        tokens = [f"tok{i}" for i in range(L)]
        truth = (rng.random((16, L)) > 0.8).astype(float)
        sizes[L] = png_size(alignment_matrix(truth, rng.random((16, L)), tokens, tmp_path / f"a{L}.png"))
    (w20, h20), (w80, h80) = sizes[20], sizes[80]
    assert 2.5 < w80 / w20 < 4.5  # grows with the tokens...
    assert abs(h80 - h20) < 0.1 * h20  # ...not with anything else
    assert w80 < 80 * 0.2 * 110 + 400  # about 0.2 inch per token at 110 dpi


def test_write_eval_plots_draws_every_task_with_its_name(tmp_path, multilabel_data, monkeypatch):
    y, probs = multilabel_data
    rng = np.random.default_rng(2)
    n = len(y)
    color = rng.integers(-1, C, n)  # -1: rows without a colour label
    style = rng.integers(0, 4, n)
    tasks = {
        "colour": TaskScores(NAMES, color, rng.dirichlet(np.ones(C), n)),
        "style/cut": TaskScores(["a", "b", "c", "d"], style, np.eye(4)[style] * 0.7 + 0.075),
    }
    titles = []

    def spy(y_true, probs, classnames, path, title="", **kw):
        titles.append(title)
        assert len(y_true) == len(probs) and y_true.shape[1] == len(classnames)
        return roc_pr_curves(y_true, probs, classnames, path, title, **kw)

    monkeypatch.setattr(report, "roc_pr_curves", spy)

    from vlclassify.methods.tags import Tags

    class Method:
        classnames = NAMES
        tags = Tags()  # no figures beyond the ROC/PR curves

    ds = Dataset(items=[Item(image=None, text="x", labels=tuple(np.flatnonzero(r))) for r in y], classnames=NAMES)
    ds.multilabel = True
    paths = write_eval_plots(Method(), ds, None, tmp_path / "plots", title="cma-clip on items.csv (test)", tasks=tasks)
    assert [p.name for p in paths] == ["roc_pr-colour.png", "roc_pr-style_cut.png"]
    assert titles == ["cma-clip on items.csv (test) · task colour", "cma-clip on items.csv (test) · task style/cut"]
    for p in paths:
        png_size(p)
    (single,) = write_eval_plots(Method(), ds, probs, tmp_path / "plots1", title="dicls")
    assert single.name == "roc_pr.png" and titles[-1] == "dicls"


def test_heatmap_lives_in_plots(tmp_path):
    img = Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    out = save_heatmap(img, np.arange(49.0).reshape(7, 7), tmp_path / "h.png", title="cat")
    with Image.open(out) as im:
        assert im.size == (224, 224 + 18)
    import importlib.util

    assert importlib.util.find_spec("vlclassify.viz") is None
