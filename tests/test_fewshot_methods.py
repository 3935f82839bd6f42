"""Few-shot adapters (issue 3): CMM, VT-CLIP, Tip-Adapter(-F), cross-modal linear probe, explain."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlclassify.data import image_folder
from vlclassify.errors import ConfigError, DataError
from vlclassify.features import extract_features
from vlclassify.methods import Encoded, create_method, load_method
from vlclassify.methods.cmm import CMMConfig, alpha_weights, fused_log_probs, schedule_of
from vlclassify.modules.fusions.cross_attention import MultiHeadAttention
from vlclassify.modules.losses.triplet import prototype_triplet_loss, prototype_triplet_loss_dense

FAST = {  # small budgets so the whole file stays quick
    "cmm": {"steps": 120},
    "vt-clip": {"steps": 30, "eval_every": 10},
    "tip-adapter": {},
    "tip-adapter-f": {"epochs": 5},
    "cross-modal-linear-probe": {"steps": 40},
}


@pytest.fixture(scope="module")
def enc(toy, tmp_path_factory):
    """Colour folder encoded once with flips and spatial tokens: (train, val)."""
    from conftest import make_color_folder

    ds = image_folder(make_color_folder(tmp_path_factory.mktemp("c") / "colors", per_class=6))["all"]
    fs = extract_features(toy, ds, views=("orig", "flip"), spatial=True, progress=False)
    e = Encoded(ds, fs)
    y = ds.labels()
    tr = [i for c in range(3) for i in np.flatnonzero(y == c)[:3]]
    va = [i for c in range(3) for i in np.flatnonzero(y == c)[3:]]
    return e.subset(tr), e.subset(va), ds


@pytest.mark.parametrize("name", list(FAST))
def test_a_saved_head_meets_features_of_another_width(name, toy, enc, tmp_path):
    tr, va, _ = enc
    m = create_method(name, toy, **FAST[name])
    m.fit(tr, va).save_pretrained(tmp_path / name)
    m2 = load_method(tmp_path / name, backbone=toy)
    bad = Encoded(va.dataset, va.features.index(range(len(va))))
    bad.features.image = torch.zeros(len(va), 8)
    if bad.features.spatial is not None:
        bad.features.spatial = torch.zeros(len(va), bad.features.spatial.shape[1], 8)
    with pytest.raises(ConfigError, match="8-d"):
        m2.predict_proba(bad)


def test_methods_learn_separable_colours(toy, enc):
    """Colour classes are separable in toy features: the trained adapters must fit them well."""
    tr, va, _ = enc
    for name, opts in [
        ("tip-adapter", {}),
        ("cmm", {"schedule": "fast", "fast_batch": 16, "steps": 600, "lr": 1e-2, "min_lr": 1e-3, "fusion": "logit"}),
        ("cross-modal-linear-probe", {"steps": 100}),
    ]:
        m = create_method(name, toy, **opts)
        acc = (m.fit(tr, va).predict(va) == va.dataset.labels()).mean()
        assert acc >= 0.8, (name, acc)


def test_triplet_loss_hand_made_case():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two images
    T = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # unnormalised prototypes (re-normalised inside)
    y = torch.tensor([0, 0])
    # image 0: D_pos = 0, negatives D = 1 (class 1), 1 - 1/sqrt2 (class 2, hardest) -> 1/sqrt2
    # image 1: D_pos = 1, negatives D = 0 (class 1, hardest) -> 1 - 0 + 1 = 2
    expected = (1 / np.sqrt(2) + 2.0) / 2
    assert prototype_triplet_loss(v, T, y, margin=1.0).item() == pytest.approx(expected, abs=1e-6)
    assert prototype_triplet_loss(v, T, y, margin=0.0).item() == pytest.approx((0 + 1.0) / 2, abs=1e-6)
    Tp = torch.randn(7, 5, requires_grad=True)
    Td = Tp.detach().clone().requires_grad_(True)
    vv, yy = torch.randn(6, 5), torch.randint(0, 7, (6,))
    a, b = prototype_triplet_loss(vv, Tp, yy), prototype_triplet_loss_dense(vv, Td, yy)
    a.backward(), b.backward()
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    torch.testing.assert_close(Tp.grad, Td.grad)


@pytest.mark.parametrize("grid", ["spread", "alpha"])
def test_alpha_is_chosen_on_validation_only(grid, toy, enc, monkeypatch):
    """The fusion search sees the validation features and labels, never the test set; the spread
    grid runs from zero-shot only to CMM only, the paper's is its alpha grid."""
    import vlclassify.methods.cmm as cmm_mod

    tr, va, ds = enc
    seen = {}
    real = cmm_mod.select_best

    def spy(candidates, evaluate, **kw):
        seen["candidates"] = list(candidates)
        return real(candidates, evaluate, **kw)

    monkeypatch.setattr(cmm_mod, "select_best", spy)
    spied = []
    real_parts = cmm_mod.CMMHead.parts

    def parts(self, batch):
        spied.append(batch["image"].shape[0])
        return real_parts(self, batch)

    monkeypatch.setattr(cmm_mod.CMMHead, "parts", parts)
    m = create_method("cmm", toy, steps=50, fusion_grid=grid)
    m.fit(tr, va)
    want = (
        [alpha_weights(a, "prob") for a in m.config.alpha_grid]
        if grid == "alpha"
        else [(1.0, 0.0), *seen["candidates"][1:-1], (0.0, 1.0)]  # prob fusion: a mixture, both ends
    )
    assert seen["candidates"] == want and spied[-1] == len(va)
    assert m.fit_info["fusion_source"] == "validation" and tuple(m.fit_info["fusion"]) in want
    assert m.fit_info["fusion_candidates"] == len(want) and 1 <= m.fit_info["fusion_tied"] <= len(want)
    assert tuple(m.head.weights.tolist()) == tuple(m.fit_info["fusion"])
    fixed = create_method("cmm", toy, steps=50, fixed_alpha=True, alpha=0.7)
    fixed.fit(tr, va)
    assert (
        fixed.head.weights.tolist() == pytest.approx([1 / 1.7, 0.7 / 1.7])
        and fixed.fit_info["fusion_source"] == "fixed"
    )


def test_tip_adapter_search_uses_val_and_changes_with_it(toy, enc):
    tr, va, _ = enc
    m = create_method("tip-adapter", toy).fit(tr, va)
    assert m.fit_info["fusion_candidates"] == 13 * len(m.config.beta_grid)  # 13 weights, zero-shot to cache only
    paper = create_method("tip-adapter", toy, fusion_grid="alpha").fit(tr, va)
    assert paper.fit_info["fusion_candidates"] == len(m.config.alpha_grid) * len(m.config.beta_grid)
    assert paper.fit_info["zs_weight"] == 1.0 and paper.fit_info["alpha"] in m.config.alpha_grid
    assert create_method("tip-adapter", toy).fit(tr).fit_info["fusion_source"].startswith("default")


def test_cmm_ablation_switches_change_behaviour(toy, enc):
    """The paper's ablations on the paper's form (residual W on the joint embedding); with the
    bridge, no_w keeps the bridge fixed instead."""
    tr, va, _ = enc
    out = {}
    for k, o in {
        "full": {},
        "no_w": {"no_w": True},
        "no_triplet": {"no_triplet": True},
        "no_clip_fusion": {"no_clip_fusion": True},
    }.items():
        m = create_method("cmm", toy, input="joint", steps=150, lr=1e-2, fixed_alpha=True, **o)
        m.fit(tr, va)
        # the raw softmax: the switches must change the model itself, not only its calibration
        # (each fit picks its own temperature on validation)
        out[k] = (m, m.predict_proba(va, calibrated=False))
    assert out["no_w"][0].head.W is None and out["full"][0].head.W is not None
    assert float(out["full"][0].head.W.abs().sum()) > 0  # W moved from its zero start
    for k in ("no_w", "no_triplet", "no_clip_fusion"):
        assert not np.allclose(out[k][1], out["full"][1], atol=1e-4), k
    # without fusion the (uncalibrated) prediction is Logits_CMM alone
    m = out["no_clip_fusion"][0]
    x = F.normalize(va.features.image.float(), dim=-1)
    s = m.scale * F.normalize(x @ m.head.W + x, dim=-1) @ m.head.T.T
    np.testing.assert_allclose(out["no_clip_fusion"][1], torch.softmax(s, -1).numpy(), atol=1e-5)
    # and its calibrated scores are the same logits over the temperature chosen on validation
    t = m.calibration().temperature
    np.testing.assert_allclose(m.predict_proba(va), torch.softmax(s / t, -1).numpy(), atol=1e-5)
    bridged = {}
    for k, o in {"full": {}, "no_w": {"no_w": True}}.items():
        m = create_method("cmm", toy, input="bridge", steps=150, lr=1e-2, fixed_alpha=True, **o)
        m.fit(tr, va)
        bridged[k] = m.head.bridge
    assert bridged["no_w"].dw is None and float(bridged["full"].dw.abs().sum()) > 0  # the bridge moved


def test_cmm_fusion_and_schedules():
    cmm, zs = torch.randn(4, 3), torch.randn(4, 3)
    p = fused_log_probs(cmm, zs, alpha_weights(0.5, "prob"), "prob").exp()
    expected = (0.5 * cmm.softmax(-1) + zs.softmax(-1)) / 1.5
    torch.testing.assert_close(p, expected)
    paper, fast = schedule_of(CMMConfig()), schedule_of(CMMConfig(schedule="fast", fast_batch=256))
    assert (paper.steps, paper.batch_size, paper.lr, paper.warmup_steps) == (16000, 8, 1e-4, 50)
    assert fast.steps * fast.batch_size == 128000 and fast.lr == pytest.approx(1e-4 * (256 / 8) ** 0.5)
    assert paper.lr_at(0, 100) == pytest.approx(1e-4 / 50) and paper.lr_at(49, 16000) == pytest.approx(1e-4)
    assert paper.lr_at(16000, 16000) == pytest.approx(1e-5) and paper.keep == "last"
    with pytest.raises(ConfigError, match="schedule"):
        schedule_of(CMMConfig(schedule="slow"))


def test_cross_attention_mask_and_weights():
    att = MultiHeadAttention(8, heads=2)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[False] * 5, [False, False, True, True, True]])
    out, w = att(q, k, key_padding_mask=mask)
    assert out.shape == (2, 3, 8) and w.shape == (2, 2, 3, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3))
    assert float(w[1, :, :, 2:].detach().abs().max()) == 0.0


def test_explain_map_and_png(toy, enc, tmp_path):
    tr, va, ds = enc
    m = create_method("vt-clip", toy, steps=10, eval_every=5)
    m.fit(tr, va)
    item = ds.items[0]
    heat = m.explain(item, "green")
    assert heat.shape == (4, 4) and np.isfinite(heat).all() and heat.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="unknown class"):
        m.explain(item, "purple")
    with pytest.raises(ConfigError, match="no attention to explain"):
        create_method("tip-adapter", toy).fit(tr, va).explain(item, "green")
    # CLI: fit-free path through a saved model
    m.save_pretrained(tmp_path / "vt")
    from typer.testing import CliRunner

    from vlclassify.cli import app

    out = tmp_path / "heat.png"
    r = CliRunner().invoke(app, ["explain", str(tmp_path / "vt"), item.image.path, "--class", "red", "--out", str(out)])
    assert r.exit_code == 0, r.output
    im = Image.open(out)
    assert im.format == "PNG" and min(im.size) >= 224


def test_bad_input(toy, enc):
    tr, va, ds = enc
    one = tr.subset([i for i, l in enumerate(tr.dataset.labels()) if l == 0])
    one = Encoded(one.dataset.__class__(items=one.dataset.items, classnames=["blue"], name="one"), one.features)
    for name in FAST:
        with pytest.raises(DataError, match="at least 2 classes"):
            create_method(name, toy).fit(one)
    missing = tr.subset([i for i, l in enumerate(tr.dataset.labels()) if l != 2])
    with pytest.raises(DataError, match="no training images for class.*red"):
        create_method("cmm", toy).fit(missing)
    nan = tr.subset(range(len(tr)))
    nan.features.image = nan.features.image.clone()
    nan.features.image[2, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        create_method("tip-adapter", toy).fit(nan)
    sp = tr.subset(range(len(tr)))
    sp.features.spatial = sp.features.spatial.clone()
    sp.features.spatial[1, 0, 0] = float("nan")
    with pytest.raises(DataError, match="spatial features: NaN"):
        create_method("vt-clip", toy).fit(sp)
    with pytest.raises(ConfigError, match="fusion"):
        create_method("cmm", toy, fusion="sum")
    with pytest.raises(ConfigError, match="heads"):
        create_method("vt-clip", toy, heads=3)
    assert json.dumps(dataclasses.asdict(CMMConfig()))  # configs stay JSON-serialisable for config.json


def test_bench_drops_tiny_classes(enc):
    from vlclassify.fewshot import drop_small_classes

    _, _, ds = enc
    small = ds.subset([i for i, l in enumerate(ds.labels()) if l != 1 or i % 6 == 0])  # one class keeps 1 image
    kept, dropped = drop_small_classes(small, 3)
    assert dropped == [ds.classnames[1]] and kept.num_classes == 2
    assert sorted(set(kept.labels().tolist())) == [0, 1] and len(kept) == len(small) - 1
    with pytest.raises(DataError, match="fewer than 2 classes"):
        drop_small_classes(small, 100)


def test_cross_attention_factorised_path_equals_standard():
    """Few queries over many keys take the folded-projection path: same outputs and weights."""
    torch.manual_seed(0)
    att = MultiHeadAttention(8, heads=2)
    q, k = torch.randn(2, 2, 8), torch.randn(2, 30, 8)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 20:] = True
    out_f, w_f = att(q, k, key_padding_mask=mask)  # factorised (value is key, Lq << Lk)
    out_s, w_s = att(q, k, k.clone(), key_padding_mask=mask)  # standard path (value given separately)
    torch.testing.assert_close(out_f, out_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_f, w_s, atol=1e-6, rtol=1e-5)
