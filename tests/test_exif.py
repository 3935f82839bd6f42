"""A phone photo stored sideways with an EXIF Orientation tag gets the answer of its upright copy from
`predict` (library and CLI), `eval` (CLI) and the service: the photo a viewer shows is the photo
classified (issue 19's check, issue 20's case). Once 0 of 6 such photos scored like their upright
selves."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

from vlclassify.cli import app
from vlclassify.context import RunContext
from vlclassify.data import load_data, train_val_test
from vlclassify.features import FeatureCache
from vlclassify.methods import create_method, load_method
from vlclassify.serve import create_app

PHOTO = "/usr/share/backgrounds/mate/nature/LadyBird.jpg"  # mate-backgrounds (the Makefile installs it)
ATOL = 1e-5


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(sideways.jpg: the pixels stored rotated with Orientation 6, upright.png: those pixels turned
    as Orientation 6 prescribes, independently of vlclassify, saved losslessly, raw.png: the stored
    pixels without the tag). 160 x 100: under the decoder's reduction threshold for the toy backbone."""
    d = tmp_path_factory.mktemp("photos")
    with Image.open(PHOTO) as im:
        upright = im.convert("RGB").reduce(16)  # [100, 160] a real photo, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    upright.transpose(Image.Transpose.ROTATE_90).save(d / "sideways.jpg", quality=92, exif=exif)
    with Image.open(d / "sideways.jpg") as stored:
        assert stored.getexif()[0x0112] == 6 and stored.size == (100, 160)
        stored.convert("RGB").save(d / "raw.png")
        stored.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(d / "upright.png")
    return d / "sideways.jpg", d / "upright.png", d / "raw.png"


@pytest.fixture(scope="module")
def model_dir(toy, tmp_path_factory):
    from conftest import make_color_folder

    splits = train_val_test(load_data(str(make_color_folder(tmp_path_factory.mktemp("colors")))), seed=0)
    m = create_method("linear-probe", toy)
    m.fit(
        splits["train"],
        splits["val"],
        ctx=RunContext(cache=FeatureCache(tmp_path_factory.mktemp("cache")), progress=False),
    )
    return m.save_pretrained(tmp_path_factory.mktemp("model") / "lp")


def scores(pred: dict) -> dict[str, float]:
    return {s["label"]: s["score"] for s in pred["scores"]}


def assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= ATOL, (a, b)


def test_the_stored_pixels_alone_would_score_otherwise(photos, model_dir):
    """The check below could fail: without the tag, the sideways pixels get other scores."""
    sideways, upright, raw = photos
    m = load_method(model_dir)
    got = m.predict_results([str(raw), str(upright)], top=3)
    a, b = scores(got[0].to_dict()), scores(got[1].to_dict())
    assert max(abs(a.get(k, 0) - b.get(k, 0)) for k in a.keys() | b.keys()) > 1e-3


def test_predict_eval_and_the_service_see_the_upright_photo(photos, model_dir, tmp_path):
    sideways, upright, _ = photos
    m = load_method(model_dir)
    lib = [scores(p.to_dict()) for p in m.predict_results([str(sideways), str(upright)], top=3)]
    assert_same(lib[0], lib[1])

    runner = CliRunner()
    r = runner.invoke(app, ["predict", str(model_dir), str(sideways), str(upright), "--top", "3", "--json"])
    assert r.exit_code == 0, r.output
    cli = [scores(json.loads(line)) for line in r.output.strip().splitlines()]
    assert_same(cli[0], cli[1])
    assert_same(cli[0], lib[0])

    manifest = tmp_path / "photos.csv"
    manifest.write_text(f"image,label\n{sideways},red\n{upright},red\n")
    report = tmp_path / "eval.json"
    r = runner.invoke(
        app,
        [
            "eval",
            str(model_dir),
            "--data",
            f"{manifest}?classes=blue,green,red",
            "--split",
            "all",
            "--out",
            str(report),
        ],
    )
    assert r.exit_code == 0, r.output
    with open(tmp_path / "predictions-all.csv", newline="") as f:
        rows = {row["item"]: row for row in csv.DictReader(f)}
    ev = [
        {c: float(s) for c, s in (p.split(":") for p in rows[str(p)]["scores"].split(";"))} for p in (sideways, upright)
    ]
    assert rows[str(sideways)]["decision"] == rows[str(upright)]["decision"]
    assert_same(ev[0], ev[1])
    assert_same(ev[0], lib[0])

    with TestClient(create_app(m), base_url="http://127.0.0.1") as client:
        served = []
        for path in (sideways, upright):
            resp = client.post("/predict?top=3", content=path.read_bytes())
            assert resp.status_code == 200, resp.text
            served.append(resp.json())
    assert served[0]["labels"] == served[1]["labels"]
    assert_same(scores(served[0]), scores(served[1]))
    assert_same(scores(served[0]), lib[0])


def test_the_upright_copy_is_what_a_viewer_shows(photos):
    """The reference is independent of the decoder: PIL's own transpose for Orientation 6."""
    from vlclassify.data import decode

    sideways, upright, _ = photos
    assert np.array_equal(np.asarray(decode(str(sideways))), np.asarray(Image.open(upright)))
    assert np.array_equal(
        np.asarray(decode(io.BytesIO(sideways.read_bytes()).getvalue())), np.asarray(Image.open(upright))
    )
