import json

import pytest
import torch

from vlclassify.data import image_folder
from vlclassify.errors import DataError
from vlclassify.features import FeatureCache, extract_features


def test_extract_shapes_views_and_cache_hit(toy, color_folder, cache, encoder_calls):
    ds = image_folder(color_folder)["all"]
    fs = extract_features(toy, ds, views=("orig", "flip"), spatial=True, cache=cache, progress=False)
    assert fs.image.shape == (18, 16) and fs.spatial.shape == (18, 16, 16) and fs.grid == (4, 4)
    assert "flip" in fs.views and not torch.equal(fs.views["flip"].spatial, fs.spatial)
    assert sum(n for _, n in encoder_calls) == 36  # 18 images x 2 views
    spaces = cache.store.spaces()
    assert sorted(s["key"]["view"] for s in spaces) == ["flip", "orig"] and all(s["rows"] == 18 for s in spaces)
    again = extract_features(toy, ds, cache=cache, progress=False)  # spatial rows serve a plain request
    assert torch.equal(again.image, fs.image) and torch.equal(again.pooled, fs.pooled)
    assert sum(n for _, n in encoder_calls) == 36 and len(cache.store.spaces()) == 2


def test_a_read_only_run_reads_the_store_but_adds_no_row(toy, color_folder, cache, encoder_calls):
    """RunContext(cache_write=False), what predict and the service use: stored rows are read, new
    images are extracted in memory only (a method's predict reaches extract_features this way)."""
    from vlclassify.context import RunContext
    from vlclassify.methods import create_method

    ds = image_folder(color_folder)["all"]
    f_idx = [0, 1, 6, 7, 12, 13]  # two images of each colour
    r_idx = [i for i in range(18) if i not in f_idx]
    first, rest = ds.subset(f_idx), ds.subset(r_idx)
    stored = extract_features(toy, first, cache=cache, progress=False)
    assert sum(n for _, n in encoder_calls) == 6 and sum(s["rows"] for s in cache.store.spaces()) == 6
    m = create_method("linear-probe", toy, C_grid=[1.0]).fit(first, ctx=RunContext(cache=cache, progress=False))
    read_only = RunContext(cache=cache, progress=False, cache_write=False)
    enc = m.encode(ds, ctx=read_only)
    assert sum(n for _, n in encoder_calls) == 6 + 12  # the 6 stored images are read, not recomputed
    assert torch.equal(enc.features.tensor("pooled")[f_idx], stored.pooled)
    assert sum(s["rows"] for s in cache.store.spaces()) == 6  # and the store is as it was
    again = extract_features(toy, rest, cache=cache, progress=False)  # a writing run stores them now
    assert torch.equal(again.pooled, enc.features.tensor("pooled")[r_idx])
    assert sum(s["rows"] for s in cache.store.spaces()) == 18


def test_mismatched_key_recomputes(toy, color_folder, cache, encoder_calls):
    ds = image_folder(color_folder)["all"]
    fs = extract_features(toy, ds, cache=cache, progress=False)
    (space,) = cache.store.spaces()
    key = dict(space["key"], preprocess={"size": 999})  # the index now claims another identity
    cache.store.db.execute("UPDATE spaces SET key=? WHERE id=?", (json.dumps(key), space["id"]))
    again = extract_features(toy, ds, cache=FeatureCache(cache.root), progress=False)
    assert sum(n for _, n in encoder_calls) == 36 and torch.allclose(again.image, fs.image)


def test_changed_backbone_options_change_the_key(color_folder, cache):
    from vlclassify.backbones import create_backbone

    ds = image_folder(color_folder)["all"]
    a = extract_features(create_backbone("toy", seed=0), ds, cache=cache, progress=False)
    b = extract_features(create_backbone("toy", seed=1), ds, cache=cache, progress=False)
    assert not torch.allclose(a.image, b.image)


def test_corrupt_image_error_or_skip(toy, color_folder, cache):
    (color_folder / "red" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = image_folder(color_folder)["all"]
    with pytest.raises(DataError, match="broken.png"):
        extract_features(toy, ds, cache=cache, progress=False)
    fs = extract_features(toy, ds, cache=cache, progress=False, skip_bad=True)
    assert len(fs.skipped) == 1 and ds.items[fs.skipped[0]].image.describe().endswith("broken.png")


def test_item_texts_are_encoded(toy, tmp_path, color_folder, cache):
    from vlclassify.data import manifest

    img = next((color_folder / "red").iterdir())
    p = tmp_path / "m.csv"
    p.write_text(f"image,label,text\n{img},a,red thing\n{img},b,\n")
    ds = manifest(p)["all"]
    fs = extract_features(toy, ds, cache=cache, progress=False)
    assert fs.text.shape == (2, 16) and fs.text[1].abs().sum() == 0 and fs.text[0].norm() > 0.99


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from safetensors.torch import save_file

    from vlclassify.utils import atomic_path

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "m.safetensors") as t:
            save_file({"a": torch.zeros(1)}, str(t))
        with atomic_path(tmp_path / "entry", is_dir=True) as t:
            (t / "f").write_text("x")
    finally:
        os.umask(umask)
    assert oct((tmp_path / "m.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "entry").stat().st_mode & 0o777) == oct(0o755)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
