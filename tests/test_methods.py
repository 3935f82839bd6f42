import numpy as np
import pytest
import torch

from vlclassify.data import image_folder
from vlclassify.errors import ConfigError, DataError
from vlclassify.features import extract_features
from vlclassify.methods import Encoded, create_method, load_method


@pytest.fixture
def colors(color_folder):
    return image_folder(color_folder)["all"]


def test_linear_probe_learns_separable_classes_and_roundtrips(toy, colors, tmp_path):
    m = create_method("linear-probe", toy).fit(colors, colors)
    p = m.predict_proba(colors)
    assert p.shape == (18, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (p.argmax(1) == colors.labels()).mean() == 1.0
    assert m.fit_info["C"] in m.config.C_grid and len(m.fit_info["val_score_by_C"]) == len(m.config.C_grid)
    assert m.fit_info["C_tied"] >= 1 and m.fit_info["C_candidates"] == len(m.config.C_grid)
    m.save_pretrained(tmp_path / "lp")
    assert sorted(f.name for f in (tmp_path / "lp").iterdir()) == ["config.json", "model.safetensors"]
    m2 = load_method(tmp_path / "lp", backbone=toy)
    np.testing.assert_allclose(m2.predict_proba(colors), p, atol=1e-6)


def test_zero_shot_templates_and_roundtrip(toy, colors, tmp_path):
    m = create_method("zero-shot", toy, templates="select7").fit(colors)
    assert m.head.class_embeds.shape == (3, 16)
    assert torch.allclose(m.head.class_embeds.norm(dim=-1), torch.ones(3))
    m.save_pretrained(tmp_path / "zs")
    np.testing.assert_allclose(
        load_method(tmp_path / "zs", backbone=toy).predict_proba(colors), m.predict_proba(colors), atol=1e-6
    )
    with pytest.raises(ConfigError, match="unknown template set"):
        create_method("zero-shot", toy, templates="nonsense")


def test_zero_shot_on_real_backbone_beats_chance(effnet):
    """Tux Paint, image+caption zero-shot: shared docs measured 57%; chance is ~7%."""
    from vlclassify.data import tuxpaint
    from vlclassify.metrics import score

    ds = tuxpaint()["all"]
    sub = ds.subset(range(0, len(ds), 3))
    both = create_method("zero-shot", effnet, modality="both").fit(sub)
    assert score("single-label", sub.labels(), both.predict_proba(sub))["accuracy"] > 0.4


def test_bad_input_errors(toy, colors, tmp_path):
    with pytest.raises(DataError, match="at least 2 classes"):
        create_method("linear-probe", toy).fit(
            colors.subset(range(6)).__class__(items=colors.items[:6], classnames=["blue"], name="one")
        )
    missing_red = colors.subset([i for i, l in enumerate(colors.labels()) if l != 2])
    with pytest.raises(DataError, match="no training images for class.*red"):
        create_method("linear-probe", toy).fit(missing_red)
    fs = extract_features(toy, colors, progress=False)
    fs.pooled[3, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        create_method("linear-probe", toy).fit(Encoded(colors, fs))
    m = create_method("linear-probe", toy).fit(colors, colors)
    m.save_pretrained(tmp_path / "lp")
    from vlclassify.backbones import create_backbone

    with pytest.raises(ConfigError, match="16-d backbone"):
        load_method(tmp_path / "lp", backbone=create_backbone("toy", dim=8))
    with pytest.raises(ConfigError, match="not fitted"):
        create_method("linear-probe", toy).predict_proba(colors)


def test_option_of_the_wrong_type_is_named(toy):
    with pytest.raises(ConfigError, match=r"option max_iter='abc' must be int"):
        create_method("linear-probe", toy, max_iter="abc")
    with pytest.raises(ConfigError, match=r"option C_grid='oops' must be list"):
        create_method("linear-probe", toy, C_grid="oops")
    create_method("linear-probe", toy, C_grid=[1, 10.0], max_iter=50)  # ints are fine where floats are expected
