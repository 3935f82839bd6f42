"""ONNX export: one graph from pixels to probabilities, checked in ONNX Runtime against predict_proba
on real Tux Paint photos (effnet-minilm, methods fitted here on a few of them), its sidecar, and the
one-line refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vlclassify.cli import app
from vlclassify.data import Dataset, Item, decode, tuxpaint
from vlclassify.errors import ConfigError
from vlclassify.export import export_onnx, export_problem
from vlclassify.methods import create_method
from vlclassify.methods.base import methods_tagged

EXPORTABLE = methods_tagged("onnx")  # every method declaring an ONNX export is exported and checked
FAST = {
    "linear-probe": {"C_grid": [1.0]},
    "cmm": {"steps": 40},
    "tip-adapter-f": {"epochs": 3},
    "cross-modal-linear-probe": {"steps": 12, "eval_every": 4},
    "vt-clip": {"steps": 12, "eval_every": 4},
}
CLASSES = ("animals", "food", "plants")


@pytest.fixture(scope="module")
def tux():
    """Three Tux Paint categories: 4 training and 2 validation photos each, 2 more to check on."""
    ds = tuxpaint()["all"]
    keep = [ds.classnames.index(c) for c in CLASSES]
    by = {c: [it for it in ds.items if it.label == c] for c in keep}

    def part(lo, hi, name):
        items = [replace(it, label=k, tasks=None, text=None) for k, c in enumerate(keep) for it in by[c][lo:hi]]
        return Dataset(items=items, classnames=list(CLASSES), name=name)

    return part(0, 4, "train"), part(4, 6, "val"), [it.image.path for c in keep for it in by[c][6:8]]


def onnx_probs(path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_matches_predict_proba_on_real_photos(name, effnet, tux, cache, tmp_path):
    train, val, photos = tux
    m = create_method(name, effnet, **FAST.get(name, {}))
    m.fit(train, val)
    res = export_onnx(m, tmp_path / "m.onnx", check_images=photos)
    assert res.checked == len(photos) and res.max_diff <= 1e-4
    # checked again here, independently of the exporter's own check, in batches of 1 and all
    pixels = torch.stack([effnet.preprocess(decode(p)) for p in photos]).numpy()
    want = m.predict_proba(photos)
    got = np.concatenate([onnx_probs(res.graph, pixels[:1]), onnx_probs(res.graph, pixels[1:])])
    assert got.shape == (len(photos), 3) and np.abs(got - want).max() <= 1e-4
    assert np.allclose(got.sum(-1), 1, atol=1e-5) and ((got > 0.01) & (got < 0.99)).any()  # not saturated
    side = json.loads(res.sidecar.read_text())
    assert (
        side["classes"] == list(CLASSES) and side["method"] == name and side["outputs"]["probs"]["scores"] == "softmax"
    )
    assert side["inputs"]["pixels"]["shape"] == ["n", 3, 224, 224] and side["preprocessing"]["range"] == [-1, 1]
    assert side["decision"]["kind"] == m.decision().kind and side["decision"]["rule"] == m.decision().describe()
    assert side["check"]["max_abs_diff"] == res.max_diff


def test_multilabel_scores_are_sigmoids(toy, cache, tmp_path):
    from test_contract import write_manifest
    from vlclassify.data import load_data

    splits = load_data(str(write_manifest(tmp_path / "multi", "multi")))
    m = create_method("linear-probe", toy, C_grid=[1.0])
    m.fit(splits["train"], splits["val"])
    res = export_onnx(m, tmp_path / "ml.onnx", check_images=[it.image.path for it in splits["test"].items])
    side = json.loads(res.sidecar.read_text())
    assert side["outputs"]["probs"]["scores"] == "sigmoid" and side["multilabel"] is True
    assert side["decision"]["kind"] == "thresholds" and len(side["decision"]["thresholds"]) == 3


def test_refusals_are_one_line_and_write_nothing(toy, tmp_path):
    texty = create_method("zero-shot", toy, modality="text").set_classes(list(CLASSES))
    with pytest.raises(ConfigError, match="paired text") as e:
        export_onnx(texty, tmp_path / "t.onnx")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
    cma = create_method("cma-clip", toy)  # its inference runs the backbone's top with its own weights
    assert "cma-clip cannot be exported" in export_problem(cma) and "\n" not in export_problem(cma)


def test_a_graph_that_disagrees_is_not_written(toy, tmp_path, monkeypatch):
    m = create_method("zero-shot", toy).set_classes(list(CLASSES))
    real = m.predict_proba
    monkeypatch.setattr(m, "predict_proba", lambda data, **kw: real(data, **kw)[:, ::-1].copy())  # a wrong reference
    with pytest.raises(ConfigError, match="differs from predict_proba"):
        export_onnx(m, tmp_path / "w.onnx")
    assert not list(tmp_path.iterdir())


def test_cli_export(toy, tmp_path):
    runner = CliRunner()
    m = create_method("zero-shot", toy).set_classes(list(CLASSES))
    m.save_pretrained(tmp_path / "zs")
    photo = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.full((30, 40, 3), (200, 40, 30), dtype=np.uint8)).save(photo)
    r = runner.invoke(app, ["export", str(tmp_path / "zs"), "--format", "onnx", "--check", str(photo)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "zs" / "model.onnx").is_file() and "checked on 1 image(s)" in r.output
    side = json.loads((tmp_path / "zs" / "model.onnx.json").read_text())
    item = Item(image=np.asarray(Image.open(photo).convert("RGB")), key="x")
    got = onnx_probs(tmp_path / "zs" / "model.onnx", toy.preprocess(decode(item))[None].numpy())
    assert side["classes"] == list(CLASSES) and np.abs(got - m.predict_proba([item])).max() <= 1e-4
    r = runner.invoke(app, ["export", str(tmp_path / "zs"), "--format", "tflite"])
    assert r.exit_code != 0 and "tflite" in str(r.exception or r.output)
