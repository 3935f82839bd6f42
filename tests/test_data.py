import json

import numpy as np
import pytest

from vlclassify.data import (
    coop_split,
    decode,
    fashion_mnist,
    fewshot,
    image_folder,
    load_data,
    manifest,
    sample_per_class,
    tuxpaint,
)
from vlclassify.errors import DataError


def test_image_folder(color_folder):
    ds = image_folder(color_folder)["all"]
    assert ds.classnames == ["blue", "green", "red"]
    assert len(ds) == 18 and set(ds.labels()) == {0, 1, 2}


def test_image_folder_empty_class_is_named(color_folder):
    (color_folder / "purple").mkdir()
    with pytest.raises(DataError, match="purple"):
        image_folder(color_folder)


def test_csv_manifest_multilabel_and_errors(tmp_path, color_folder):
    img = next((color_folder / "red").iterdir())
    p = tmp_path / "m.csv"
    p.write_text(f"image,labels,text\n{img},scab rust,a leaf\n{img},healthy,\n")
    ds = manifest(p)["all"]
    assert ds.multilabel and ds.classnames == ["healthy", "rust", "scab"]
    assert ds.items[0].labels == (1, 2) and ds.items[0].text == "a leaf"
    assert ds.multi_hot().tolist() == [[0, 1, 1], [1, 0, 0]]
    with pytest.raises(DataError, match=r"m.csv:3: label 'healthy' is not in the class list"):
        manifest(p, classes=["scab", "rust"])
    p.write_text(f"image,label\n{img},a\nmissing.png,b\n")
    with pytest.raises(DataError, match=r"m.csv:3: image file not found"):
        manifest(p)


def test_jsonl_manifest_tasks_and_splits(tmp_path, color_folder):
    imgs = sorted(str(p) for p in (color_folder / "red").iterdir())  # distinct images: copies would be dropped
    rows = [
        {"image": imgs[i], "text": "red shirt", "color": "red", "style": "plain", "split": s}
        for i, s in enumerate(("train", "test"))
    ]
    rows.append({"image": imgs[2], "text": "x", "color": "blue", "style": "striped", "split": "train"})
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    splits = manifest(p)
    assert set(splits) == {"train", "test"}
    assert splits["train"].tasks == {"color": ["blue", "red"], "style": ["plain", "striped"]}
    assert splits["train"].task_labels("style").tolist() == [0, 1]
    p.write_text('{"image": "a.png"\n')
    with pytest.raises(DataError, match=r"m.jsonl:1: invalid JSON"):
        manifest(p)


def test_coop_split(tmp_path, color_folder):
    data = {
        "train": [["red/red_0.png", 0, "red_thing"], ["blue/blue_0.png", 1, "blue"]],
        "val": [["red/red_1.png", 0, "red_thing"]],
        "test": [["blue/blue_1.png", 1, "blue"]],
    }
    p = tmp_path / "split.json"
    p.write_text(json.dumps(data))
    s = coop_split(p, root=color_folder)
    assert s["train"].classnames == ["red thing", "blue"] and len(s["test"]) == 1
    assert decode(s["train"].items[0]).size == (24, 24)
    data["test"][0] = ["x.png", 0, "other"]
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match="named 'other' here"):
        coop_split(p)


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="bad.jpg: cannot read image"):
        decode(str(bad))


def test_rgba_is_pasted_on_white():
    arr = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    assert np.asarray(decode(arr)).min() == 255


def test_fashion_mnist_from_debian_package():
    s = fashion_mnist()
    assert len(s["train"]) == 60000 and len(s["test"]) == 10000
    assert np.bincount(s["test"].labels()).tolist() == [1000] * 10
    assert s["train"].items[0].image.array.shape == (28, 28)


def test_tuxpaint_photos_only_with_captions():
    ds = tuxpaint()["all"]
    assert len(ds.classnames) == 15 and "symbols" not in ds.classnames
    assert not any("cartoon" in it.image.path for it in ds.items)
    assert sum(bool(it.text) for it in ds.items) > 0.9 * len(ds)
    assert all("=" not in (it.text or "") for it in ds.items)
    assert "subcategory" in ds.tasks


def test_fewshot_is_deterministic_disjoint_and_sized():
    pool = fashion_mnist()["train"]
    tr1, va1 = fewshot(pool, 4, seed=1)
    tr2, va2 = fewshot(pool, 4, seed=1)
    tr3, _ = fewshot(pool, 4, seed=2)
    assert [i.key for i in tr1.items] == [i.key for i in tr2.items]
    assert [i.key for i in tr1.items] != [i.key for i in tr3.items]
    assert np.bincount(tr1.labels()).tolist() == [4] * 10
    assert np.bincount(va1.labels()).tolist() == [4] * 10
    assert not {i.key for i in tr1.items} & {i.key for i in va1.items}
    _, va16 = fewshot(pool, 16, seed=1)
    assert len(va16) == 40  # min(K, 4) per class


def test_more_shots_than_images_uses_all_and_warns(color_folder):
    ds = image_folder(color_folder)["all"]
    with pytest.warns(UserWarning, match="fewer than 10"):
        idx = sample_per_class(ds, 10, seed=0)
    assert len(idx) == 18


def test_data_spec_errors():
    with pytest.raises(DataError, match="no such file"):
        load_data("/nonexistent/thing.csv")


def test_label_seen_once_warns_as_a_possible_typo(tmp_path, color_folder):
    imgs = sorted(str(p) for p in color_folder.rglob("*.png"))  # 18 distinct images
    p = tmp_path / "m.csv"
    p.write_text("image,label\n" + "".join(f"{i},{('rust', 'scab')[j % 2]}\n" for j, i in enumerate(imgs[:12])))
    p.write_text(p.read_text() + f"{imgs[12]},rsut\n")
    with pytest.warns(UserWarning, match="'rsut' appear in one row only"):
        manifest(p)
