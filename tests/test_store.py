"""The per-image feature store: rows keyed by content hash, reused across datasets, splits and runs;
damaged shards recomputed alone; the index rebuilt from shard manifests; `vlclassify cache info|prune`."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vlclassify.backbones import create_backbone
from vlclassify.cli import app
from vlclassify.data import Dataset, Item, image_folder, load_data, train_val_test
from vlclassify.features import FeatureCache, encode_texts, extract_features
from vlclassify.features import store as store_mod


def _count(calls) -> int:
    return sum(n for _, n in calls)


@pytest.fixture
def csv_data(color_folder, tmp_path):
    """A manifest without a split column (so `fit` carves train/val/test from it), with captions."""
    rows = ["image,label,text"]
    for p in sorted(color_folder.rglob("*.png")):
        rows.append(f"{p},{p.parent.name},a {p.parent.name} square")
    path = tmp_path / "x.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_extract_then_fit_on_a_split_extracts_nothing(csv_data, tmp_path, toy, encoder_calls, monkeypatch):
    cache_dir = tmp_path / "cache"
    r = CliRunner().invoke(app, ["extract", "-d", str(csv_data), "-b", "toy", "--cache-dir", str(cache_dir)])
    assert r.exit_code == 0, r.output
    assert _count(encoder_calls) == 18 and "18 extracted" in r.output
    texts = []
    real = type(toy).encode_texts_normalized
    monkeypatch.setattr(
        type(toy), "encode_texts_normalized", lambda self, t, *a: texts.append(len(t)) or real(self, t, *a)
    )
    cache = FeatureCache(cache_dir)
    splits = train_val_test(load_data(str(csv_data)), seed=1)
    for ds in splits.values():  # every split of X is another dataset: its rows all come from the store
        fs = extract_features(toy, ds, cache=cache, progress=False)
        assert fs.image.shape == (len(ds), 16) and fs.text.shape == (len(ds), 16)
    assert _count(encoder_calls) == 18
    whole = extract_features(toy, load_data(str(csv_data))["all"], cache=cache, progress=False)
    sub = extract_features(toy, splits["val"], cache=cache, progress=False)
    pos = {it.key: i for i, it in enumerate(load_data(str(csv_data))["all"].items)}
    idx = [pos[it.key] for it in splits["val"].items]
    assert torch.equal(sub.image, whole.image[idx]) and torch.equal(sub.text, whole.text[idx])
    r = CliRunner().invoke(
        app,
        ["fit", "-m", "linear-probe", "-d", str(csv_data), "-b", "toy", "-o", str(tmp_path / "m")]
        + ["--cache-dir", str(cache_dir)],
    )
    assert r.exit_code == 0, r.output
    assert _count(encoder_calls) == 18  # `fit` extracted nothing
    assert texts == []  # nor re-encoded a caption: `extract` stored them too


def test_the_same_image_elsewhere_reuses_its_row(toy, color_folder, tmp_path, cache, encoder_calls):
    a = extract_features(toy, image_folder(color_folder)["all"], cache=cache, progress=False)
    copy = shutil.copytree(color_folder, tmp_path / "renamed")
    for p in sorted(copy.rglob("*.png")):
        p.rename(p.with_name("copy-" + p.name))  # other paths, same bytes
    b = extract_features(toy, image_folder(copy)["all"], cache=cache, progress=False)
    assert _count(encoder_calls) == 18 and torch.equal(a.image, b.image)
    arrays = [np.asarray(Image.open(p)) for p in sorted(color_folder.rglob("*.png"))[:3]]
    ds = Dataset([Item(image=x, label=0, key=f"arr{i}") for i, x in enumerate(arrays)], ["a", "b"])
    extract_features(toy, ds, cache=cache, progress=False)
    assert _count(encoder_calls) == 21  # in-memory arrays are other content (their hash is of the pixels)
    extract_features(toy, ds.subset([2, 0]), cache=cache, progress=False)
    assert _count(encoder_calls) == 21


def test_changed_weights_or_preprocessing_never_reuse_a_row(color_folder, cache, encoder_calls):
    ds = image_folder(color_folder)["all"]
    extract_features(create_backbone("toy"), ds, cache=cache, progress=False)
    extract_features(create_backbone("toy", seed=3), ds, cache=cache, progress=False)  # other weights
    extract_features(create_backbone("toy", image_size=48), ds, cache=cache, progress=False)  # other preprocessing
    assert _count(encoder_calls) == 3 * 18 and len(cache.store.spaces()) == 3


def test_spatial_request_recomputes_rows_stored_without_tokens(toy, color_folder, cache, encoder_calls):
    ds = image_folder(color_folder)["all"]
    plain = extract_features(toy, ds, cache=cache, progress=False)
    sp = extract_features(toy, ds, spatial=True, cache=cache, progress=False)
    assert _count(encoder_calls) == 36 and sp.spatial.shape == (18, 16, 16) and sp.grid == (4, 4)
    assert torch.equal(plain.image, sp.image)
    again = extract_features(toy, ds.subset([4, 5]), spatial=True, cache=cache, progress=False)
    assert _count(encoder_calls) == 36 and torch.equal(again.spatial, sp.spatial[[4, 5]])


def test_damaged_shard_is_detected_and_only_its_rows_recomputed(toy, color_folder, tmp_path, encoder_calls):
    ds = image_folder(color_folder)["all"]
    cache = FeatureCache(tmp_path / "c", shard_rows=5)
    ref = extract_features(toy, ds, spatial=True, cache=cache, progress=False)
    shards = cache.store.shards()
    assert [s["rows"] for s in shards] == [5, 5, 5, 3]
    victim = cache.store.space_dir(shards[1]["space"]) / f"{shards[1]['name']}.safetensors"
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0xFF  # one flipped byte in the float data: same size, still a valid safetensors file
    victim.write_bytes(bytes(data))
    store_mod._VERIFIED.clear()  # as in a new process
    again = extract_features(toy, ds, spatial=True, cache=FeatureCache(cache.root, shard_rows=5), progress=False)
    assert _count(encoder_calls) == 18 + 5  # the damaged shard's rows, nothing else
    assert torch.equal(again.image, ref.image) and torch.equal(again.spatial, ref.spatial)
    assert shards[1]["name"] not in {s["name"] for s in FeatureCache(cache.root).store.shards()}


def test_index_is_rebuilt_from_manifests_and_uncommitted_files_are_ignored(toy, color_folder, tmp_path, encoder_calls):
    ds = image_folder(color_folder)["all"]
    root = tmp_path / "c"
    ref = extract_features(toy, ds, cache=FeatureCache(root, shard_rows=4), progress=False)
    (root / "store" / "index.sqlite").unlink()  # lost index: the manifests are the truth
    sdir = next(p for p in (root / "store").iterdir() if p.is_dir())
    (sdir / "ghost-00000.safetensors").write_bytes(b"half-written, no manifest")  # a killed write
    again = extract_features(toy, ds, cache=FeatureCache(root), progress=False)
    assert _count(encoder_calls) == 18 and torch.equal(again.image, ref.image)
    (root / "store" / "index.sqlite").write_bytes(b"not a database" * 100)  # damaged index: rebuilt too
    again = extract_features(toy, ds, cache=FeatureCache(root), progress=False)
    assert _count(encoder_calls) == 18 and torch.equal(again.image, ref.image)


def test_read_only_writers_commit_through_their_manifests(toy, color_folder, tmp_path, encoder_calls):
    """Other ranks of a distributed run write shards and manifests only; the next writable open merges them."""
    ds = image_folder(color_folder)["all"]
    root = tmp_path / "c"
    ref = extract_features(toy, ds, cache=FeatureCache(root, read_only=True), progress=False)
    assert sqlite3.connect(root / "store" / "index.sqlite").execute("SELECT count(*) FROM rows").fetchone()[0] == 0
    again = extract_features(toy, ds, cache=FeatureCache(root), progress=False)
    assert _count(encoder_calls) == 18 and torch.equal(again.image, ref.image)


def test_unreadable_images_are_not_stored(toy, color_folder, cache, encoder_calls):
    (color_folder / "red" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = image_folder(color_folder)["all"]
    fs = extract_features(toy, ds, cache=cache, progress=False, skip_bad=True)
    bad = [i for i, it in enumerate(ds.items) if it.image.describe().endswith("broken.png")]
    assert fs.skipped == bad and fs.image[bad].abs().sum() == 0
    assert cache.store.spaces()[0]["rows"] == 18


def test_text_rows_are_per_distinct_text(toy, cache, monkeypatch):
    seen = []
    real = type(toy).encode_texts_normalized
    monkeypatch.setattr(
        type(toy), "encode_texts_normalized", lambda self, t, *a: seen.append(list(t)) or real(self, t, *a)
    )
    a = encode_texts(toy, ["red", "", "blue", "red"], cache)
    assert seen == [["red", "blue"]] and a[1].abs().sum() == 0 and torch.equal(a[0], a[3])
    b = encode_texts(toy, ["blue", "green"], cache)
    assert seen[1] == ["green"] and torch.equal(b[0], a[2])


def test_cache_info_and_prune(toy, color_folder, tmp_path):
    root = tmp_path / "c"
    ds = image_folder(color_folder)["all"]
    extract_features(toy, ds, views=("orig", "flip"), cache=FeatureCache(root, shard_rows=8), progress=False)
    extract_features(create_backbone("toy", seed=5), ds, cache=FeatureCache(root), progress=False)
    stale = root / "features" / "0123456789abcdef"  # a per-dataset entry of the previous cache version
    stale.mkdir(parents=True)
    (stale / "meta.json").write_text(json.dumps({"key": {"kind": "image"}}))
    run = lambda *a: CliRunner().invoke(app, ["cache", *a, "--cache-dir", str(root)])  # noqa: E731
    r = run("info", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert sorted((s["view"], s["rows"], s["shards"]) for s in info["spaces"]) == [
        ("flip", 18, 3),
        ("orig", 18, 1),
        ("orig", 18, 3),
    ]
    assert info["stale_entries"] == 1 and info["store_bytes"] > 0
    r = run("info")
    assert r.exit_code == 0 and "toy" in r.output and "1 from an older cache version" in r.output
    victim = next((root / "store").glob("*/*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-4] + b"\0\0\0\1")
    r = run("info", "--verify")
    assert r.exit_code == 0 and "verified: 1 damaged shard(s) dropped" in r.output
    extract_features(toy, ds, views=("orig", "flip"), cache=FeatureCache(root, shard_rows=8), progress=False)
    extract_features(create_backbone("toy", seed=5), ds, cache=FeatureCache(root), progress=False)  # refilled
    r = run("prune", "--backbone", "toy", "--dry-run")
    assert "would remove 7 shard(s) (54 rows), 1 entr" in r.output
    assert len(FeatureCache(root).store.shards()) == 7
    r = run("prune", "--max-size", "1")  # least recently used first, until the rest fits in 1 byte
    assert r.exit_code == 0 and "removed 7 shard(s)" in r.output and not stale.exists()
    assert FeatureCache(root).store.shards() == []
    r = run("prune", "--max-size", "ten")
    assert r.exit_code != 0 and "expected a number with a unit" in str(r.exception)


def test_prune_by_age_and_all(toy, color_folder, tmp_path, encoder_calls):
    root = tmp_path / "c"
    ds = image_folder(color_folder)["all"]
    extract_features(toy, ds, cache=FeatureCache(root), progress=False)
    c = FeatureCache(root)
    c.store.db.execute("UPDATE shards SET used=used-40*86400")
    assert c.prune(older_than=30 * 86400)["shards"] == 1
    extract_features(toy, ds, cache=FeatureCache(root), progress=False)
    assert _count(encoder_calls) == 36  # the pruned rows were extracted again
    assert FeatureCache(root).prune(older_than=30 * 86400)["shards"] == 0
    assert FeatureCache(root).prune(everything=True)["rows"] == 18
    assert FeatureCache(root).store.spaces() == []
