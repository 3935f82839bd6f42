"""Fitting on precomputed features: `--data feats.safetensors` / `.npz`, no image needed."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vlclassify.cli import app
from vlclassify.data import image_folder, load_data, load_precomputed, plan_splits, save_precomputed
from vlclassify.data.precomputed import class_text_of
from vlclassify.errors import DataError
from vlclassify.features import extract_features
from vlclassify.methods import Encoded, create_method

runner = CliRunner()


@pytest.fixture
def colors(color_folder, toy, cache):
    """The colour folder, its toy features (orig + flip, spatial) and a train/val/test split."""
    ds = image_folder(color_folder)["all"]
    f = extract_features(toy, ds, views=("orig", "flip"), spatial=True, cache=cache, progress=False)
    split = ["train", "train", "train", "val", "test", "test"] * 3  # 6 images per class, in class order
    return ds, f, split


def _write(path, ds, f, split, **extra):
    return save_precomputed(
        path, image=f.image, labels=torch.as_tensor(ds.labels()), classnames=ds.classnames, pooled=f.pooled,
        split=split, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_and_a_fit_equal_to_fitting_on_the_images(colors, toy, cache, tmp_path, suffix):
    ds, f, split = colors
    p = _write(tmp_path / f"feats{suffix}", ds, f, split)
    raw = load_data(str(p))
    assert {k: len(v) for k, v in raw.items()} == {"train": 9, "val": 3, "test": 6}
    assert raw["train"].classnames == ds.classnames and raw["train"].features.image.shape == (9, toy.embed_dim)
    idx = {s: [i for i, x in enumerate(split) if x == s] for s in ("train", "val", "test")}
    assert torch.equal(raw["test"].features.image, f.image[idx["test"]])  # rows follow their items
    a = create_method("linear-probe", toy).fit(raw["train"], raw["val"])
    b = create_method("linear-probe", toy).fit(
        Encoded(ds.subset(idx["train"]), f.index(idx["train"])), Encoded(ds.subset(idx["val"]), f.index(idx["val"]))
    )
    np.testing.assert_allclose(a.predict_proba(raw["test"]), b.predict_proba(ds.subset(idx["test"])), atol=1e-6)


def test_cli_fit_eval_linear_probe_and_zero_shot(colors, tmp_path):
    ds, f, split = colors
    p = _write(tmp_path / "feats.safetensors", ds, f, split)
    for method in ("linear-probe", "zero-shot"):
        out = tmp_path / method
        r = runner.invoke(app, ["fit", "-m", method, "-d", str(p), "-o", str(out), "--backbone", "toy"])
        assert r.exit_code == 0, r.output
        assert "train 9, val 3, test 6" in r.output
        rows = json.loads((out / "split.json").read_text())["train"]
        assert rows[0] == ["feats.safetensors#0", 0, "blue"] and len(rows) == 9
        r = runner.invoke(app, ["eval", str(out)])
        assert r.exit_code == 0, r.output
        rep = json.loads((out / "eval-test.json").read_text())
        assert rep["n"] == 6
    assert json.loads((tmp_path / "linear-probe" / "eval-test.json").read_text())["top1"] == 1.0


def test_fewshot_on_a_file_without_split(colors, tmp_path, toy, cache):
    ds, f, _ = colors
    p = save_precomputed(tmp_path / "all.npz", image=f.image, labels=ds.labels(), classnames=ds.classnames)
    plan = plan_splits(str(p), shots=2, seed=1)
    assert (len(plan["train"]), len(plan["val"]), len(plan["test"])) == (6, 6, 6)
    m = create_method("linear-probe", toy, feature="pooled").fit(plan["train"], plan["val"])
    fs = extract_features(toy, plan["train"])
    assert torch.equal(fs.pooled, fs.image)  # without pooled features the embeddings stand in
    assert m.predict_proba(plan["test"]).shape == (6, 3)


def test_what_a_method_needs_and_the_file_lacks_is_named(colors, tmp_path, toy, cache):
    ds, f, split = colors
    p = _write(tmp_path / "plain.safetensors", ds, f, split)
    raw = load_data(str(p))
    with pytest.raises(DataError, match=r"needs spatial tokens of view\(s\) orig; the file has none"):
        extract_features(toy, raw["train"], spatial=True)
    with pytest.raises(DataError, match=r"no 'flip' \('flip.image'\)"):
        create_method("tip-adapter", toy).fit(raw["train"], raw["val"])
    full = _write(
        tmp_path / "full.safetensors", ds, f, split, spatial=f.spatial, grid=f.grid,
        views={"flip": {"image": f.views["flip"].image, "pooled": f.views["flip"].pooled}},
    )  # fmt: skip
    raw = load_data(str(full))
    fs = extract_features(toy, raw["train"], views=("orig", "flip"))
    sp = extract_features(toy, raw["train"], spatial=True)
    assert sp.grid == f.grid and torch.equal(sp.spatial, f.spatial[[0, 1, 2, 6, 7, 8, 12, 13, 14]])
    assert torch.equal(fs.views["flip"].image, f.views["flip"].image[[0, 1, 2, 6, 7, 8, 12, 13, 14]])
    with pytest.raises(DataError, match=r"spatial tokens of view\(s\) flip"):
        extract_features(toy, raw["train"], views=("orig", "flip"), spatial=True)  # flip.spatial not given
    create_method("tip-adapter", toy).fit(raw["train"], raw["val"])  # now it has the flip view


def test_class_text_rows_follow_the_class_names(colors, tmp_path, toy):
    ds, f, split = colors
    ct = torch.randn(3, toy.embed_dim)
    p = _write(tmp_path / "ct.safetensors", ds, f, split, class_text=ct)
    train = load_data(str(p))["train"]
    assert torch.equal(class_text_of(train), ct)
    reordered = train.subset(range(len(train)))
    reordered.classnames = list(reversed(train.classnames))
    assert torch.equal(class_text_of(reordered), ct.flip(0))  # looked up by name
    assert class_text_of(ds) is None  # data read from images: the backbone encodes the prompts


def test_multi_hot_labels_make_multilabel_data(tmp_path):
    y = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.uint8)
    p = save_precomputed(tmp_path / "ml.safetensors", image=torch.randn(4, 8), labels=y, classnames=["a", "b", "c"])
    ds = load_data(str(p))["all"]
    assert ds.multilabel and [it.labels for it in ds.items] == [(0, 2), (1,), (), (0, 1, 2)]
    np.testing.assert_array_equal(ds.multi_hot(), y.numpy())


def _raw_file(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "tensors,meta,match",
    [
        ({"image": torch.ones(4, 8, dtype=torch.int32)}, None, r"'image' must be a float tensor \[\*, \*\], got int32"),
        ({"image": torch.ones(4)}, None, r"'image' must have shape \[\*, \*\], got float32 \[4\]"),
        ({"labels": torch.zeros(4)}, None, r"'labels' must be an integer tensor, got float32 \[4\]"),
        ({"labels": torch.tensor([0, 1, 5, 0])}, None, r"labels\[2\] = 5 is not a class index 0..1"),
        ({"labels": torch.zeros(3, dtype=torch.int64)}, None, "'labels' has 3 rows but 'image' has 4"),
        ({"labels": torch.full((4, 2), 2.0)}, None, r"multi-hot labels\[0, 0\] = 2.0 is not 0 or 1"),
        ({"pooled": torch.ones(5, 3)}, None, r"'pooled' must have shape \[4, \*\], got float32 \[5, 3\]"),
        ({"spatial": torch.ones(4, 5, 8)}, None, "5 tokens, not a square: give 'grid'"),
        ({"spatial": torch.ones(4, 6, 7)}, None, r"'spatial' must have shape \[4, \*, 8\]"),
        ({"spatial": torch.ones(4, 6, 8)}, {"grid": "[2, 2]"}, r"'grid' must be \(h, w\) with h \* w = 6"),
        ({"class_text": torch.ones(3, 8)}, None, r"'class_text' must have shape \[2, 8\]"),
        ({"split": torch.tensor([0, 1, 3, 0])}, None, r"split\[2\] = 3; codes are 0 train, 1 val, 2 test"),
        ({}, {"split": '["train", "val", "tset", "train"]'}, r"split\[2\] = 'tset'"),
        ({"labes": torch.zeros(4)}, None, "unknown entry 'labes'"),
        ({"flip.pooled": torch.ones(4, 3)}, None, "view 'flip' has no 'flip.image' entry"),
        ({"image": torch.tensor([[0.0] * 8] * 3 + [[float("nan")] * 8])}, None, r"'image' has NaN .* row 3"),
        ({}, {"classnames": '["a", "a"]'}, "class name 'a' appears more than once"),
        ({}, {"classnames": "not json"}, "metadata 'classnames' is not JSON"),
    ],
)
def test_bad_files_are_rejected_by_name(tmp_path, tensors, meta, match):
    base = {"image": torch.randn(4, 8), "labels": torch.tensor([0, 1, 1, 0])}
    p = _raw_file(tmp_path / "bad.safetensors", {**base, **tensors}, {"classnames": '["a", "b"]', **(meta or {})})
    with pytest.raises(DataError, match=match):
        load_data(str(p))


def test_missing_entries_and_pickles_are_refused(tmp_path):
    p = _raw_file(tmp_path / "nolabels.safetensors", {"image": torch.randn(2, 4)}, {"classnames": '["a", "b"]'})
    with pytest.raises(DataError, match="missing the 'labels' entry"):
        load_precomputed(p)
    p = _raw_file(tmp_path / "nonames.safetensors", {"image": torch.randn(2, 4), "labels": torch.tensor([0, 1])})
    with pytest.raises(DataError, match="no class names; add a 'classnames' metadata JSON list"):
        load_precomputed(p)
    p = tmp_path / "pickled.npz"
    np.savez(
        p, image=np.ones((2, 4), np.float32), labels=np.array([0, 1]), classnames=np.array([{"a": 1}], dtype=object)
    )
    with pytest.raises(DataError, match="'classnames' cannot be read without unpickling"):
        load_precomputed(p)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_precomputed(tmp_path / "junk.safetensors")


def test_a_backbone_of_another_width_is_named(tmp_path, toy):
    p = save_precomputed(
        tmp_path / "w.npz", image=torch.randn(4, toy.embed_dim + 1), labels=[0, 1, 0, 1], classnames=["a", "b"]
    )
    with pytest.raises(
        DataError, match=rf"{toy.embed_dim + 1}-d but backbone 'toy' has a {toy.embed_dim}-d joint space"
    ):
        extract_features(toy, load_data(str(p))["all"])


def test_save_never_leaves_a_bad_file(tmp_path):
    with pytest.raises(DataError, match="labels"):
        save_precomputed(tmp_path / "x.safetensors", image=torch.randn(3, 4), labels=[0, 1, 7], classnames=["a", "b"])
    assert not (tmp_path / "x.safetensors").exists()


def test_bench_fewshot_on_a_feature_file_drops_small_classes_with_their_rows(colors, tmp_path):
    ds, f, _ = colors
    keep = list(range(14))  # blue 6, green 6, red 2 rows
    p = save_precomputed(
        tmp_path / "b.safetensors", image=f.image[keep], labels=ds.labels()[keep], classnames=ds.classnames
    )
    args = ["bench", "fewshot", "-d", str(p), "--methods", "linear-probe[C_grid=[1.0]]", "--shots", "1,2"]
    args += ["--seeds", "1", "--min-per-class", "3", "--backbone", "toy", "--out", str(tmp_path), "--name", "b"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["dropped_classes"] == ["red"]
    assert [(x["n_train"], x["n_val"], x["n_test"]) for x in res["runs"]] == [(2, 2, 8), (4, 4, 4)]
    assert all(x["test_accuracy"] == 1.0 for x in res["runs"])


def test_methods_use_the_files_class_texts(colors, tmp_path, toy, cache):
    """Zero-shot on a file with class_text scores against those rows, not the backbone's prompts."""
    import torch.nn.functional as F

    from vlclassify.methods import create_method

    ds, f, split = colors
    ct = torch.randn(3, toy.embed_dim)
    p = _write(tmp_path / "ct.safetensors", ds, f, split, class_text=ct)
    splits = load_data(str(p))
    zs = create_method("zero-shot", toy).fit(splits["train"])
    test = splits["test"]
    expected = torch.softmax(toy.logit_scale * F.normalize(test.features.image, dim=-1) @ F.normalize(ct, dim=-1).T, -1)
    np.testing.assert_allclose(zs.predict_proba(test), expected.numpy(), atol=1e-5)
    plain = create_method("zero-shot", toy).fit(
        load_data(str(_write(tmp_path / "no.safetensors", ds, f, split)))["train"]
    )
    assert not np.allclose(plain.predict_proba(test), expected.numpy(), atol=1e-3)
    flip = _write(
        tmp_path / "flip.safetensors",
        ds,
        f,
        split,
        class_text=ct,
        views={"flip": {"image": f.image.clone(), "pooled": f.pooled.clone()}},
    )
    cmm = create_method("cmm", toy, steps=1, fixed_alpha=True)
    cmm.fit(load_data(str(flip))["train"])
    torch.testing.assert_close(cmm.head.t0, F.normalize(ct, dim=-1))
