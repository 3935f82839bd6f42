"""CMA-CLIP on the toy backbone (and stage 2 on a tiny random CLIP): three stages, save/load,
keyless attention, ablations, bad input, and recall at precision on hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlclassify.backbones import create_backbone
from vlclassify.data.items import Dataset, Item
from vlclassify.errors import ConfigError, DataError
from vlclassify.methods import create_method, load_method
from vlclassify.metrics.ranking import recall_at_precision
from vlclassify.modules.fusions.keyless_attention import KeylessAttention

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHAPES = ["round", "square"]


def make_data(n: int = 48, seed: int = 0) -> Dataset:
    """Task color: visible in the image only. Task shape: named in the text only."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        c, s = i % 3, (i // 3) % 2
        arr = np.clip(np.array(list(COLORS.values())[c])[None, None] + rng.normal(0, 20, (24, 24, 3)), 0, 255)
        items.append(
            Item(
                image=arr.astype(np.uint8),
                label=c,
                text=f"a {SHAPES[s]} thing",
                tasks={"color": c, "shape": s},
                key=f"toy{seed}-{i}",
            )
        )
    return Dataset(items=items, classnames=list(COLORS), name="toyset", tasks={"color": list(COLORS), "shape": SHAPES})


FAST = dict(
    frozen_epochs=6,
    e2e_epochs=2,
    tune_epochs=3,
    width=32,
    heads=2,
    layers=1,
    head_hidden=32,
    batch_size=16,
    lr=1e-2,
    e2e_lr=1e-3,
)


def fit(cache, **opts):
    m = create_method("cma-clip", create_backbone("toy"), **{**FAST, **opts})
    data = make_data(48)
    m.fit(data.subset(range(36)), data.subset(range(36, 48)))
    return m, make_data(24, seed=1)


def _task_acc(m, ds):
    probs = m.task_probs(ds)  # {"label": main task (color), "shape": [N, 2]}
    return {
        "color": float((probs["label"].argmax(-1) == ds.task_labels("color")).mean()),
        "shape": float((probs["shape"].argmax(-1) == ds.task_labels("shape")).mean()),
    }


def test_fits_three_stages_multitask_and_roundtrips(cache, tmp_path):
    run = tmp_path / "run"
    bb = create_backbone("toy")
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    m = create_method("cma-clip", bb, **{**FAST, "run_dir": str(run)})
    data, test = make_data(48), make_data(24, seed=1)
    m.fit(data.subset(range(36)), data.subset(range(36, 48)))
    assert m.task_columns == ["color", "shape"] and m.classnames == list(COLORS)
    assert m.task_classes == {"label": list(COLORS), "shape": SHAPES}
    stages = [s["name"] for s in m.fit_info["training"]["stages"]]
    assert stages == ["frozen", "end2end", "tuning"]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in log] == ["frozen"] * 6 + ["end2end"] * 2 + ["tuning"] * 3
    acc = _task_acc(m, test)
    assert acc["color"] >= 0.9 and acc["shape"] >= 0.9, acc  # each task needs its own modality
    lam = m.outputs(test)["modality_weights"].numpy()
    assert lam.shape == (24, 2) and ((lam >= 0) & (lam <= 1)).all()
    # stage 2 trains the head's own copy of the backbone's top (test below), never the shared backbone
    assert {n.split(".")[0] for n, _ in m.head.top.named_parameters()} == {"cell_blocks", "proj", "word_blocks"}
    for k, v in bb.state_dict().items():
        assert torch.equal(before[k], v), k
    # decisions per task, and results that name the modality weights
    assert (m.predict(test) == m.task_probs(test)["label"].argmax(-1)).all()
    assert m.decision("shape").kind == "argmax"
    res = m.predict_results(list(test.items[:2]))
    assert set(res[0].tasks) == {"color", "shape"} and res[0].tasks["shape"].labels[0] in SHAPES
    assert res[0].modality_weights["shape"]["image"] == pytest.approx(float(lam[0, 1]), abs=1e-6)
    m.save_pretrained(tmp_path / "model")
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["tasks"] == {"label": list(COLORS), "shape": SHAPES} and cfg["task_columns"] == ["color", "shape"]
    again = load_method(tmp_path / "model")
    p1, p2 = m.task_probs(test), again.task_probs(test)
    for t in p1:
        np.testing.assert_allclose(p2[t], p1[t], atol=1e-6)
    np.testing.assert_allclose(again.outputs(test)["modality_weights"].numpy(), lam, atol=1e-6)
    np.testing.assert_allclose(again.predict_proba(test), p1["label"], atol=1e-6)


def test_end_to_end_stage_trains_the_top_of_a_clip(cache, tiny_clip):
    """hf-clip: stage 2 moves the head's copy of the last vision / text layers and projections
    (without validation every stage keeps its last round, so the moves are not undone by keep-best)."""
    folder, _ = tiny_clip
    bb = create_backbone("hf-clip", path=str(folder))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    m = create_method("cma-clip", bb, **{**FAST, "frozen_epochs": 1, "e2e_epochs": 2, "tune_epochs": 0, "e2e_lr": 1e-2})
    m.fit(make_data(18))
    top = m.head.top
    assert {"vision_layers", "post_layernorm", "visual_projection", "language_layers", "final_layer_norm"} <= {
        n.split(".")[0] for n, _ in top.named_parameters()
    }
    start = bb.split(1, 1).state_dict()
    moved = {n for n, p in top.named_parameters() if not torch.equal(p, start[n])}
    assert any(n.startswith("vision_layers.") for n in moved) and any(n.startswith("language_layers.") for n in moved)
    assert "visual_projection.weight" in moved and "text_projection.weight" in moved
    for k, v in bb.state_dict().items():
        assert torch.equal(before[k], v), k  # the shared backbone is untouched


def test_refuses_multilabel_data_before_extraction(cache):
    ds = Dataset(
        items=[Item(image=np.zeros((8, 8, 3), np.uint8), labels=(0, 1), key=f"m{i}") for i in range(4)],
        classnames=["a", "b"],
        multilabel=True,
        name="multi",
    )
    m = create_method("cma-clip", create_backbone("toy"))
    with pytest.raises(DataError, match="cma-clip does not take multi-label data; methods that do: .*dicls"):
        m.fit(ds)
    assert not (cache.root / "features").exists()  # refused before any trunk was computed


def test_keyless_attention_weights():
    ka = KeylessAttention(8)
    with torch.no_grad():
        ka.w.copy_(torch.randn(8))
    x = torch.randn(5, 2, 8)
    c, w = ka(x)
    assert torch.allclose(w.sum(-1), torch.ones(5)) and ((w >= 0) & (w <= 1)).all()
    lam = w[:, :1]
    assert torch.allclose(c, lam * x[:, 0] + (1 - lam) * x[:, 1], atol=1e-6)  # c = λ I' + (1 − λ) T'
    e = x @ ka.w
    assert torch.allclose(w[:, 0], torch.sigmoid(e[:, 0] - e[:, 1]), atol=1e-6)  # eq. 6
    # a missing modality gets weight 0
    c, w = ka(x, torch.tensor([[True, False]] * 5))
    assert torch.equal(w[:, 0], torch.ones(5)) and torch.allclose(c, x[:, 0])
    # fixed (the "w/o MA" ablation): the plain average whatever w is
    fixed = KeylessAttention(8, fixed=True)
    with torch.no_grad():
        fixed.w.copy_(torch.randn(8))
    c, w = fixed(x)
    assert torch.allclose(w, torch.full((5, 2), 0.5)) and torch.allclose(c, x.mean(1), atol=1e-6)


def test_ablations_change_outputs(cache):
    full, test = fit(cache)
    no_ma, _ = fit(cache, modality_attention=False)
    no_sa, _ = fit(cache, modality_attention=False, sequence_attention=False)
    lam = [m.outputs(test)["modality_weights"].numpy() for m in (full, no_ma, no_sa)]
    p = [m.predict_proba(test) for m in (full, no_ma, no_sa)]
    assert np.allclose(lam[1][:, 0], 0.5) and np.allclose(lam[2][:, 1], 0.5)
    assert not np.allclose(lam[0][:, 0], 0.5)
    assert not np.allclose(p[0], p[1])
    assert not np.allclose(p[1], p[2])
    assert not hasattr(no_sa.head, "encoder")
    with pytest.raises(ConfigError, match="without sequence attention"):
        no_sa.explain(test.items[0])


def test_missing_modalities_and_explain(cache):
    m, test = fit(cache)
    items = list(test.items)
    items[0] = Item(image=None, label=items[0].label, text=items[0].text, tasks=items[0].tasks, key="noimg")
    items[1] = Item(image=items[1].image, label=items[1].label, text="", tasks=items[1].tasks, key="notext")
    ds = Dataset(items=items, classnames=test.classnames, name="holes", tasks=test.tasks)
    lam = m.outputs(ds)["modality_weights"]
    assert lam[0, 0] == 0.0 and lam[1, 0] == 1.0  # the other modality carries it
    assert any("without an image" in n for n in m.notes) and any("empty text" in n for n in m.notes)
    heat = m.explain(test.items[2], target="square" if "square" in test.items[2].text else "round")
    assert heat.shape == (4, 4) and np.isclose(heat.sum(), 1.0, atol=1e-5) and (heat >= 0).all()
    with pytest.raises(DataError, match="token 'zebra'"):
        m.explain(test.items[2], target="zebra")


def test_bad_input_errors(cache):
    m, test = fit(cache, frozen_epochs=1, e2e_epochs=0, tune_epochs=0)
    both = Dataset(
        items=[Item(image=None, text="", label=0, tasks={"color": 0, "shape": 0}, key="empty-row")],
        classnames=test.classnames,
        name="bad",
        tasks=test.tasks,
    )
    with pytest.raises(DataError, match="empty-row.*neither an image nor a text"):
        m.outputs(both)
    other = Dataset(items=test.items, classnames=test.classnames, name="other", tasks={"color": test.tasks["color"]})
    with pytest.raises(DataError, match="task column 'shape'"):
        m.task_report(other)
    unknown = Dataset(
        items=test.items,
        classnames=test.classnames,
        name="unk",
        tasks={"color": test.tasks["color"], "shape": ["round", "striped"]},
    )
    with pytest.raises(DataError, match=r"row 3 .*task column 'shape' has label 'striped'"):
        m.task_report(unknown)
    with pytest.raises(DataError, match="no task column 'size'"):
        fit(cache, tasks=["size"])
    with pytest.raises(ConfigError, match="unknown option"):
        create_method("cma-clip", create_backbone("toy"), depth=3)


def test_recall_at_precision_hand_made():
    y = np.array([0, 1, 0, 1, 0])
    # confidences 0.9, 0.8, 0.7, 0.6, 0.55; correct T T F T F -> precision@k: 1, 1, .67, .75, .6
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.45, 0.55]])
    r = recall_at_precision(y, probs, 0.9)
    assert r["recall"] == pytest.approx(2 / 5) and r["accepted"] == 2 and r["threshold"] == pytest.approx(0.8)
    assert recall_at_precision(y, probs, 0.75)["recall"] == pytest.approx(3 / 5)
    assert recall_at_precision(y, probs, 0.0)["recall"] == pytest.approx(3 / 5)
    # all wrong: no operating point reaches 90%
    assert recall_at_precision(np.array([1, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]), 0.9)["recall"] == 0.0
    # ties are accepted together: 0.7 twice, one right one wrong -> precision 0.5 at that threshold
    tie = recall_at_precision(np.array([0, 0, 1]), np.array([[0.9, 0.1], [0.7, 0.3], [0.7, 0.3]]), 0.9)
    assert tie["recall"] == pytest.approx(1 / 3) and tie["accepted"] == 1
    # unlabelled rows (-1) are ignored
    assert recall_at_precision(np.array([0, -1]), np.array([[0.9, 0.1], [0.1, 0.9]]), 0.9)["n"] == 1


def write_manifest(tmp_path, n: int = 36, extra_row: str | None = None):
    from PIL import Image

    rows = ["image,text,color,shape"]
    for i in range(n):
        c, s = i % 3, (i // 3) % 2
        arr = np.clip(
            np.array(list(COLORS.values())[c])[None, None] + np.random.default_rng(i).normal(0, 20, (24, 24, 3)), 0, 255
        ).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"im{i}.png")
        text = "" if i == 5 else f"a {SHAPES[s]} thing"
        rows.append(f"im{i}.png,{text},{list(COLORS)[c]},{SHAPES[s]}")
    if extra_row:
        rows.append(extra_row)
    p = tmp_path / "items.csv"
    p.write_text("\n".join(rows) + "\n")
    return p


def test_cli_fit_eval_explain_and_the_study(tmp_path):
    from typer.testing import CliRunner

    from vlclassify.cli import app

    runner = CliRunner()
    man = write_manifest(tmp_path)
    opts = [f"--opt={k}={v}" for k, v in FAST.items()]
    out = tmp_path / "model"
    r = runner.invoke(
        app,
        [
            "fit",
            "-m",
            "cma-clip",
            "-d",
            str(man),
            "-o",
            str(out),
            "-b",
            "toy",
            "--val-fraction",
            "0.25",
            "--test-fraction",
            "0.25",
            *opts,
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "eval-test.json").read_text())
    assert set(rep["tasks"]) == {"color", "shape"}
    assert {"accuracy", "recall@90P", "lambda"} <= set(rep["tasks"]["shape"])
    assert "recall@90%P" in r.output
    r = runner.invoke(
        app,
        ["explain", str(out), str(tmp_path / "im4.png"), "--text", "a square thing", "-o", str(tmp_path / "heat.png")],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "heat.png").stat().st_size > 0
    assert "'square'" in r.output or "'thing'" in r.output  # the default is a content word, never 'a'
    r = runner.invoke(
        app,
        [
            "explain",
            str(out),
            str(tmp_path / "im4.png"),
            "--text",
            "a square thing",
            "--class",
            "square",
            "-o",
            str(tmp_path / "heat2.png"),
        ],
    )
    assert r.exit_code == 0 and "'square'" in r.output, r.output
    r = runner.invoke(app, ["explain", str(out), str(tmp_path / "im4.png"), "-o", str(tmp_path / "heat3.png")])
    assert isinstance(r.exception, DataError) and "--text" in str(r.exception)  # main() prints it as one line
    from conftest import load_study

    load_study("cma").main(
        ["-d", str(man), "-b", "toy", "--folds", "3", "--fold-limit", "1", "--variants", "CMA-CLIP,CMA-CLIP w/o MA"]
        + ["--out", str(tmp_path), "--name", "b", *[o for o in opts if "epochs" in o or "width" in o or "heads" in o]]
    )
    res = json.loads((tmp_path / "b.json").read_text())
    assert "CMA-CLIP, text emptied" in res["rows"] and "zero-shot image+text" in res["rows"]
    assert "| CMA-CLIP w/o MA |" in (tmp_path / "b.md").read_text()


def test_cli_unknown_task_label_names_row_and_column(tmp_path):
    from typer.testing import CliRunner

    from vlclassify.cli import app

    runner = CliRunner()
    man = write_manifest(tmp_path)
    out = tmp_path / "model"
    r = runner.invoke(
        app,
        [
            "fit",
            "-m",
            "cma-clip",
            "-d",
            str(man),
            "-o",
            str(out),
            "-b",
            "toy",
            "--opt=frozen_epochs=1",
            "--opt=e2e_epochs=0",
            "--opt=tune_epochs=0",
            "--opt=width=16",
            "--opt=heads=2",
        ],
    )
    assert r.exit_code == 0, r.output
    other = write_manifest(tmp_path, extra_row="im0.png,a purple round thing,purple,round")  # not a copy of row 2
    m = load_method(out)
    from vlclassify.data import load_data

    ds = load_data(str(other))["all"]
    with pytest.raises(DataError, match=r"task column 'color' has label 'purple'"):
        m.task_report(ds)
