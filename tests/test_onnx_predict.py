"""The torch-free predict path (onnx_predict.py): the export beside a model answers as the model
does (to 1e-5 on real Tux Paint photos, every exportable method), a cold `vlclassify predict` of
an exported model never imports torch, and a damaged or stale export is made again."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from test_export import EXPORTABLE, FAST, tux  # noqa: F401  (tux: a fixture)
from vlclassify.backbones.effnet_minilm import bridge_photos
from vlclassify.cli import app
from vlclassify.context import RunContext
from vlclassify.data import decode
from vlclassify.export import export_beside, onnx_problem
from vlclassify.methods import create_method
from vlclassify.onnx_predict import OnnxModel, export_problem_here, graph_path, sidecar_path
from vlclassify.pixels import recipe_pixels

SRC = str(Path(__file__).resolve().parents[1] / "src")


def fitted(name, backbone, train, val, cache, folder: Path):
    m = create_method(name, backbone, **FAST.get(name, {}))
    m.fit(train, val, ctx=RunContext(cache=cache, progress=False))
    m.save_pretrained(folder)
    return m


def test_numpy_pixels_are_the_backbones_preprocess(effnet, toy, tux):  # noqa: F811
    photos = tux[2] + [str(p) for p in bridge_photos()[:4]]  # stamps with transparency, and large photos
    for bb in (effnet, toy):
        for p in photos:
            im = decode(p, size=bb.image_size)
            want = bb.preprocess(im).numpy()
            assert np.abs(recipe_pixels(im, bb.pixel_recipe()) - want).max() <= 1e-5


@pytest.mark.parametrize("name", EXPORTABLE)
def test_exported_model_answers_as_the_model(name, effnet, tux, cache, tmp_path):  # noqa: F811
    train, val, photos = tux
    m = fitted(name, effnet, train, val, cache, tmp_path / "m")
    assert onnx_problem(m) is None and export_problem_here(tmp_path / "m") is not None  # not made yet
    with m.using(RunContext(cache=cache, progress=False)):
        export_beside(m, tmp_path / "m")
    assert export_problem_here(tmp_path / "m") is None
    onnx = OnnxModel(tmp_path / "m")
    want = m.predict_proba(photos)
    got = onnx.predict_proba(photos, batch_size=3)
    assert got.shape == want.shape == (len(photos), 3) and np.abs(got - want).max() <= 1e-5
    ours, theirs = onnx.predict_results(photos, top=2), m.predict_results(photos, top=2)
    assert [p.to_dict()["labels"] for p in ours] == [p.to_dict()["labels"] for p in theirs]
    assert [p.item for p in ours] == [p.item for p in theirs] == photos


def test_cold_predict_never_imports_torch(effnet, tux, cache, tmp_path):  # noqa: F811
    train, val, photos = tux
    m = fitted("linear-probe", effnet, train, val, cache, tmp_path / "lp")
    runner = CliRunner()
    first = runner.invoke(app, ["predict", str(tmp_path / "lp"), *photos[:2], "--json"])  # makes the export
    assert first.exit_code == 0, first.output
    assert graph_path(tmp_path / "lp").is_file() and export_problem_here(tmp_path / "lp") is None
    code = textwrap.dedent(
        f"""
        import sys
        from vlclassify.cli import main
        sys.argv = ["vlclassify", "predict", {str(tmp_path / "lp")!r}, *{photos[:2]!r}, "--json"]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        print("torch imported:", "torch" in sys.modules)
        """
    )
    env = {"PYTHONPATH": SRC, "VLCLASSIFY_CACHE": str(cache.root), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "torch imported: False"
    got = [json.loads(line) for line in lines[:-1]]
    want = m.predict_results(photos[:2], top=5)
    assert [g["labels"] for g in got] == [w.labels for w in want]
    for g, w in zip(got, want):
        assert np.abs(np.array([s["score"] for s in g["scores"]]) - [s for _, s in w.scores]).max() <= 1e-5


def test_damaged_or_stale_exports_are_made_again(effnet, tux, cache, tmp_path):  # noqa: F811
    train, val, photos = tux
    folder = tmp_path / "zs"
    m = fitted("zero-shot", effnet, train, val, cache, folder)
    with m.using(RunContext(cache=cache, progress=False)):
        graph = export_beside(m, folder)
    blob = bytearray(graph.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the weights: the graph still loads and runs
    graph.write_bytes(bytes(blob))
    assert "damaged" in (export_problem_here(folder) or "")
    r = CliRunner().invoke(app, ["predict", str(folder), photos[0], "--json"])
    assert r.exit_code == 0, r.output and export_problem_here(folder) is None
    assert abs(json.loads(r.output.splitlines()[-1])["scores"][0]["score"] - m.predict_proba(photos[:1]).max()) <= 1e-5
    m.fit_info["refit"] = True  # saved again: another config.json
    m.save_pretrained(folder)
    assert "stale" in (export_problem_here(folder) or "")
    side = json.loads(sidecar_path(graph).read_text())
    assert side["source"]["backbone_files"] and side["pixels"] == effnet.pixel_recipe()


def test_int8_features_are_their_own_space(effnet, tux, cache):  # noqa: F811
    from vlclassify.data import Dataset
    from vlclassify.features import extract_features

    train = tux[0]
    ds = Dataset(items=train.items[:6], classnames=train.classnames, name="int8")
    fp32 = extract_features(effnet, ds, cache=cache, progress=False, runtime="onnx")
    int8 = extract_features(effnet, ds, cache=cache, progress=False, runtime="auto", precision="int8")
    again = extract_features(effnet, ds, cache=cache, progress=False, runtime="auto")  # fp32: never int8 rows
    assert np.array_equal(again.pooled.numpy(), fp32.pooled.numpy())
    a, b = fp32.pooled.numpy(), int8.pooled.numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert not np.array_equal(a, b) and cos.min() > 0.95  # close, and not the same rows
    runtimes = {s["runtime"] for s in cache.info()["spaces"] if s["kind"] == "image"}
    assert {"onnx", "onnx-cpu-int8"} <= runtimes


def test_predict_int8(effnet, tux, cache, tmp_path):  # noqa: F811
    train, val, photos = tux
    m = fitted("linear-probe", effnet, train, val, cache, tmp_path / "lp")
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "lp"), *photos, "--json", "--precision", "int8"])
    assert r.exit_code == 0, r.output
    assert graph_path(tmp_path / "lp", "int8").is_file() and export_problem_here(tmp_path / "lp", "int8") is None
    answers = [sorted(json.loads(line)["scores"], key=lambda s: s["label"]) for line in r.output.splitlines()]
    got = np.array([[s["score"] for s in scores] for scores in answers])
    want = m.predict_proba(photos)[:, np.argsort(m.classnames)]
    assert np.abs(got - want).max() < 0.1 and (got.argmax(1) == want.argmax(1)).mean() >= 0.8
    side = json.loads(sidecar_path(graph_path(tmp_path / "lp", "int8")).read_text())
    assert side["precision"] == "int8" and side["quantization"]["calibration_images"] > 50
    bad = CliRunner().invoke(app, ["predict", str(tmp_path / "lp"), photos[0], "--precision", "int4"])
    assert bad.exit_code != 0 and "int4" in str(bad.exception)
