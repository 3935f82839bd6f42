"""The labelling session behind `vlclassify label` (in process): leases, labels.csv, multi-label, resume."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from conftest import make_color_folder
from vlclassify.context import RunContext
from vlclassify.data import load_data
from vlclassify.errors import DataError
from vlclassify.features import FeatureCache
from vlclassify.serve import ServeConfig
from vlclassify.serve.label import LabelSession, create_label_app
from vlclassify.suggest import load_pool


def _session(tmp_path, toy, labels="labels.csv", **kw) -> LabelSession:
    pool = load_pool(str(tmp_path / "pool"))
    ctx = RunContext(cache=FeatureCache(tmp_path / "cache"), progress=False)
    return LabelSession(pool, ["red", "green", "blue"], tmp_path / labels, ctx=ctx, backbone=toy, **kw)


@pytest.fixture
def pool(tmp_path):
    return make_color_folder(tmp_path / "pool", per_class=4)


def test_two_tabs_never_get_the_same_image_and_answers_need_the_lease(tmp_path, toy, pool):
    c = TestClient(base_url="http://127.0.0.1", app=create_label_app(_session(tmp_path, toy)))
    a, b = (c.post("/next", json={"tab": t}).json() for t in ("A", "B"))
    assert a["id"] != b["id"]
    assert c.post("/next", json={"tab": "A"}).json()["id"] == a["id"]  # a reload keeps the tab's image
    r = c.post("/answer", json={"tab": "B", "id": a["id"], "labels": ["red"]})
    assert r.status_code == 400 and "not leased to this tab" in r.json()["detail"]
    r = c.post("/answer", json={"tab": "A", "id": a["id"], "labels": ["red", "blue"]})
    assert r.status_code == 400 and "exactly one label" in r.json()["detail"]
    assert c.post("/answer", json={"tab": "A", "id": a["id"], "labels": ["red"]}).json()["progress"]["labelled"] == 1
    assert c.post("/skip", json={"tab": "B", "id": b["id"]}).json() == {"ok": True}
    seen = {a["id"], b["id"]}
    for _ in range(3):
        nxt = c.post("/next", json={"tab": "B"}).json()
        assert nxt["id"] not in seen  # neither the answered nor the skipped image comes back
        seen.add(nxt["id"])
        c.post("/skip", json={"tab": "B", "id": nxt["id"]})
    assert c.get("/image/9999").status_code == 404
    assert c.post("/next", json={}).status_code == 400


def test_multilabel_rows_are_a_manifest_fit_reads(tmp_path, toy, pool):
    s = _session(tmp_path, toy, multilabel=True, budget=2)
    c = TestClient(base_url="http://127.0.0.1", app=create_label_app(s))
    for labels in (["red", "blue"], ["green"]):
        item = c.post("/next", json={"tab": "A"}).json()
        assert item["multilabel"] is True
        assert c.post("/answer", json={"tab": "A", "id": item["id"], "labels": labels}).status_code == 200
    assert c.post("/next", json={"tab": "A"}).json()["done"] is True  # the budget is reached
    lines = (tmp_path / "labels.csv").read_text().splitlines()
    assert lines[0] == "image,labels" and lines[1].endswith(",red;blue") and lines[2].endswith(",green;")
    ds = load_data(str(tmp_path / "labels.csv"))["all"]
    assert ds.multilabel and [sorted(ds.classnames[i] for i in it.labels) for it in ds.items] == [
        ["blue", "red"],
        ["green"],
    ]


def test_resume_drops_a_torn_row_and_never_asks_a_labelled_image(tmp_path, toy, pool):
    s = _session(tmp_path, toy)
    c = TestClient(base_url="http://127.0.0.1", app=create_label_app(s))
    done = []
    for _ in range(3):
        item = c.post("/next", json={"tab": "A"}).json()
        c.post("/answer", json={"tab": "A", "id": item["id"], "labels": ["green"]})
        done.append(s.names[item["id"]])
    with open(tmp_path / "labels.csv", "a") as f:
        f.write(str(pool / "red" / "red_0.png"))  # a crash in the middle of writing a row
    s2 = _session(tmp_path, toy)
    assert [name for name, _ in s2.rows] == done
    assert (tmp_path / "labels.csv").read_text().endswith("green\n")
    c2 = TestClient(base_url="http://127.0.0.1", app=create_label_app(s2))
    asked = []
    while not (item := c2.post("/next", json={"tab": "B"}).json()).get("done"):
        asked.append(s2.names[item["id"]])
        c2.post("/skip", json={"tab": "B", "id": item["id"]})
    assert len(asked) == 12 - 3 and not set(asked) & set(done)


def test_undo_takes_back_the_row(tmp_path, toy, pool):
    s = _session(tmp_path, toy)
    c = TestClient(base_url="http://127.0.0.1", app=create_label_app(s))
    first = c.post("/next", json={"tab": "A"}).json()
    c.post("/answer", json={"tab": "A", "id": first["id"], "labels": ["red"]})
    assert c.post("/undo", json={"tab": "A"}).json() == {"ok": True, "id": first["id"]}
    assert (tmp_path / "labels.csv").read_text() == "image,label\n"
    assert c.post("/next", json={"tab": "A"}).json()["id"] == first["id"]
    assert c.post("/undo", json={"tab": "A"}).status_code == 400


def test_token_and_bad_labels_file(tmp_path, toy, pool):
    c = TestClient(
        base_url="http://127.0.0.1", app=create_label_app(_session(tmp_path, toy), ServeConfig(token="s3cret"))
    )
    assert c.post("/next", json={"tab": "A"}).status_code == 401
    assert c.get("/healthz").status_code == 200
    ok = c.post("/next", json={"tab": "A"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and "id" in ok.json()
    (tmp_path / "other.csv").write_text("image,label\nx.png,purple\n")
    with pytest.raises(DataError, match=r"other.csv:2: label 'purple' is not one of the classes"):
        _session(tmp_path, toy, labels="other.csv")
