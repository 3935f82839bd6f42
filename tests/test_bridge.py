"""The bridge from pooled features to the joint space: exact where it can be, fitted and cached
where it cannot, and the bridged methods starting from it (the contract test runs them all)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlclassify import create_backbone
from vlclassify.backbones import effnet_minilm
from vlclassify.backbones.base import RIDGE_GRID, BridgeLayer, ridge_bridge
from vlclassify.errors import ConfigError
from vlclassify.methods import create_method
from vlclassify.protocols import resolve_presets


def _pixels(bb, n=3, seed=0):
    rng = np.random.default_rng(seed)
    ims = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]
    return torch.stack([bb.preprocess(im) for im in ims])


def test_toy_bridge_is_exact(toy):
    w, b = toy.bridge()
    assert w.shape == (toy.embed_dim, toy.pooled_dim) and b.shape == (toy.embed_dim,)
    f = toy.encode_image(_pixels(toy))
    assert torch.allclose(f.pooled @ w.T + b, f.embeds, atol=1e-5)
    w.zero_()  # callers get fresh tensors
    assert toy.bridge()[0].abs().sum() > 0


def test_hf_clip_bridge_is_exact(tiny_clip):
    folder, _ = tiny_clip
    bb = create_backbone("hf-clip", path=str(folder))
    w, b = bb.bridge()
    assert w.shape == (24, 32)
    with torch.no_grad():
        f = bb.encode_image(_pixels(bb))
    assert torch.allclose(f.pooled @ w.T + b, f.embeds, atol=1e-5)


def test_ridge_bridge_recovers_a_linear_map_and_chooses_by_held_out_photos():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(6, 20, generator=g)
    x = torch.randn(300, 20, generator=g)
    y = x @ w_true.T + 0.5
    w, b, info = ridge_bridge(x, y, groups=np.arange(300) // 10)
    assert torch.allclose(x @ w.T + b, y, atol=1e-2)
    assert info["ridge"] == min(RIDGE_GRID)  # noiseless and well posed: the weakest ridge wins
    assert info["groups"] == 30 and info["cv_folds"] == 5
    # Few rows, many features, targets unrelated to them: held-out groups favour the strongest ridge
    # (predicting the mean), where the fit's own rows would favour the weakest.
    x = torch.randn(40, 200, generator=g)
    y = 3.0 + torch.randn(40, 6, generator=g)
    _, _, info = ridge_bridge(x, y, groups=np.arange(40) // 4)
    assert info["ridge"] == max(RIDGE_GRID) and info["fit_mean_cosine"] > info["cv_mean_cosine"]["10"]
    with pytest.raises(ValueError, match="at least 2 groups"):
        ridge_bridge(x, y, groups=[0] * 40)


def test_bridge_layer_starts_at_the_bridge_and_trains_relative_to_it(toy):
    layer = BridgeLayer(toy.pooled_dim, toy.embed_dim).reset(toy)
    f = toy.encode_image(_pixels(toy))
    assert torch.allclose(layer(f.pooled), f.embeds, atol=1e-5)
    with torch.no_grad():
        layer.dw.fill_(1.0)  # one unit of dw moves W by the RMS of the bridge
    w0, _ = toy.bridge()
    moved = layer.w0 + layer.step * layer.dw
    assert torch.allclose(moved - w0, torch.full_like(w0, float(w0.pow(2).mean().sqrt())))
    with pytest.raises(ConfigError, match="bridge maps"):
        BridgeLayer(toy.pooled_dim + 1, toy.embed_dim).reset(toy)
    fixed = BridgeLayer(toy.pooled_dim, toy.embed_dim, trainable=False)
    assert not list(fixed.parameters())


def test_effnet_bridge_is_fitted_once_and_cached(tmp_path, monkeypatch, effnet):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
        Image.fromarray(arr).save(photos / f"p{i}.png")
    monkeypatch.setenv("VLCLASSIFY_BRIDGE_PHOTOS", str(photos))
    monkeypatch.setattr(effnet, "_cache_dir", tmp_path / "cache")
    monkeypatch.setattr(effnet, "_bridge", None)
    # the fit reads images only: an image-only model never loads the MiniLM text tower for it
    monkeypatch.delitem(effnet._modules, "text", raising=False)
    monkeypatch.setattr(effnet_minilm, "quiet_from_pretrained", lambda *a, **k: pytest.fail("text tower loaded"))
    w, b = effnet.bridge()
    assert w.shape == (effnet.embed_dim, 1280) and b.shape == (effnet.embed_dim,)
    assert "text" not in effnet._modules
    files = sorted((tmp_path / "cache" / "backbones").iterdir())
    assert [f.suffix for f in files] == [".json", ".safetensors"]
    meta = files[0].read_text()
    assert '"ridge"' in meta and "p0.png" in meta
    # A second backbone reads the cache: fitting again would fail here.
    monkeypatch.setattr(effnet, "_bridge", None)
    monkeypatch.setattr(effnet_minilm, "ridge_bridge", lambda *a, **k: pytest.fail("refitted"))
    w2, b2 = effnet.bridge()
    assert torch.equal(w, w2) and torch.equal(b, b2)
    monkeypatch.setattr(effnet, "_bridge", None)
    monkeypatch.setenv("VLCLASSIFY_BRIDGE_PHOTOS", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="mate-backgrounds"):
        effnet.bridge()


def test_bridge_crops_cover_the_photo_in_colour_and_grey():
    crops = effnet_minilm.bridge_crops(Image.new("RGB", (320, 180), (200, 30, 30)))
    assert len(crops) == 2 * (2 + 4 * 2)  # whole-height squares: 2 across; half-height: 4 x 2; each also grey
    assert {c.size for c in crops} == {(180, 180), (90, 90)}
    grey = [c for c in crops if len(set(c.getpixel((0, 0)))) == 1]
    assert len(grey) == len(crops) // 2


def test_bridged_cmm_starts_at_the_zero_shot(toy, color_folder):
    """On the toy backbone the bridge is exact, so the bridged CMM's untrained logits are the
    joint-space ones: same start as the paper's form (W = 0)."""
    from vlclassify.data import image_folder

    ds = next(iter(image_folder(str(color_folder)).values()))
    outs = {}
    for form in ("bridge", "joint"):
        m = create_method("cmm", toy, input=form, steps=1, lr=0.0, min_lr=0.0, fixed_alpha=True)
        m.fit(ds)
        enc = m.encode(ds)
        assert ("pooled" in m.feature_needs()) == (form == "bridge")
        outs[form] = m.head.parts(enc.features.batch(["image", "pooled"], 0, len(enc)))[0]
    assert torch.allclose(outs["bridge"], outs["joint"], atol=1e-4)


@pytest.mark.parametrize(
    "method,form", [("cmm", "joint"), ("cross-modal-linear-probe", "joint"), ("tip-adapter", "joint")]
)
def test_input_option_is_checked(toy, method, form):
    create_method(method, toy, input=form)
    with pytest.raises(ConfigError, match="input must be"):
        create_method(method, toy, input="nonsense")


def test_paper_presets_select_the_paper_form():
    for name in ("coop-oxfordpets", "tip-adapter"):
        r = resolve_presets(name)
        assert r.options("tip-adapter")["input"] == "joint"
        assert r.options("tip-adapter-f")["input"] == "joint"
    for method in ("cmm", "cross-modal-linear-probe"):
        assert resolve_presets("coop-dtd").options(method)["input"] == "joint"
    assert "input" not in resolve_presets(None, "fashion-mnist").options("cmm")  # no preset: the default form


FORMS = {  # method -> (its two inputs, short budgets)
    "cmm": (("bridge", "joint"), {"steps": 20}),
    "cross-modal-linear-probe": (("bridge", "joint"), {"steps": 12, "eval_every": 4}),
    "tip-adapter": (("pooled", "joint"), {}),
    "tip-adapter-f": (("pooled", "joint"), {"epochs": 2}),
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_the_non_default_form_fits_predicts_saves_and_loads(name, toy, color_folder, tmp_path):
    """tests/test_contract.py runs every method's default form; this runs the other one (bridged or
    the paper's) through the same round trip, and checks which features it reads."""
    from vlclassify.data import image_folder
    from vlclassify.methods import load_method

    forms, budget = FORMS[name]
    default = create_method(name, toy).config.input
    assert default in forms
    form = next(f for f in forms if f != default)
    ds = next(iter(image_folder(str(color_folder)).values()))
    m = create_method(name, toy, input=form, **budget)
    assert ("pooled" in m.feature_needs()) == (form != "joint")
    m.fit(ds, ds)
    p = m.predict_proba(ds)
    assert p.shape == (len(ds), ds.num_classes) and np.isfinite(p).all()
    m.save_pretrained(tmp_path / "model")
    again = load_method(tmp_path / "model", backbone=toy)
    assert again.config.input == form
    np.testing.assert_allclose(again.predict_proba(ds), p, atol=1e-6)
