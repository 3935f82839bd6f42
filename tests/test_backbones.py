import numpy as np
import pytest
import torch
from PIL import Image

from vlclassify.backbones import create_backbone
from vlclassify.errors import ConfigError

TUX_FROG = "/usr/share/tuxpaint/stamps/animals/amphibians/frog.png"


def test_effnet_minilm_shapes_and_tokens(effnet):
    from vlclassify.data import decode

    x = torch.stack([effnet.preprocess(decode(TUX_FROG))] * 2)
    assert x.min() >= -1 and x.max() <= 1
    with torch.inference_mode():
        f = effnet.encode_image(x)
        t = effnet.encode_text(["a frog.", "a small red apple on a table."])
    assert f.embeds.shape == (2, 384) and f.tokens.shape == (2, 49, 384) and f.pooled.shape == (2, 1280)
    assert f.grid == (7, 7)
    assert t.embeds.shape == (2, 384) and t.tokens.shape[0] == 2 and t.tokens.shape[2] == 384
    assert t.mask[0].sum() < t.mask[1].sum()
    assert "frog" in t.token_strings[0]


def test_effnet_minilm_joint_space_is_meaningful(effnet):
    """The ConSE join puts a frog photo nearer 'a photo of a frog.' than unrelated texts."""
    from vlclassify.data import decode

    with torch.inference_mode():
        img = effnet.encode_image(effnet.preprocess(decode(TUX_FROG))[None]).embeds
        txt = effnet.encode_texts_normalized(["a photo of a frog.", "a photo of a car.", "a photo of a cake."])
    sims = torch.nn.functional.normalize(img, dim=-1) @ txt.T
    assert sims.argmax().item() == 0


def test_effnet_minilm_option_errors():
    with pytest.raises(ConfigError, match="topk"):
        create_backbone("effnet-minilm", topk=0)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        create_backbone("effnet-minilm", bogus=1)


def test_hf_clip_roundtrip_through_registry(tiny_clip):
    folder, model = tiny_clip
    bb = create_backbone("hf-clip", path=str(folder))
    assert (bb.embed_dim, bb.pooled_dim, bb.image_size) == (24, 32, 32)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    x = bb.preprocess(img)[None]
    with torch.inference_mode():
        f = bb.encode_image(x)
        t = bb.encode_text(["a cat", "a much longer sentence"])
        ref_img = model.get_image_features(pixel_values=x)
        ref_img = ref_img if torch.is_tensor(ref_img) else ref_img.pooler_output
    assert f.tokens.shape == (1, 16, 24) and f.grid == (4, 4)
    assert torch.allclose(f.embeds, ref_img, atol=1e-5)  # same numbers as the model's own API
    assert t.embeds.shape == (2, 24) and t.tokens.shape[:2] == t.mask.shape
    assert bb.identity()["weights"] != "no-weight-files"


def test_hf_clip_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="hf-clip: cannot load"):
        create_backbone("hf-clip", path=str(tmp_path / "nothing-here"), local_files_only=True)
    with pytest.raises(ConfigError, match="needs path"):
        create_backbone("hf-clip")


def test_hf_clip_method_save_load(tmp_path, tiny_clip, color_folder):
    from vlclassify.data import image_folder
    from vlclassify.methods import create_method, load_method

    folder, _ = tiny_clip
    bb = create_backbone("hf-clip", path=str(folder))
    ds = image_folder(color_folder)["all"]
    m = create_method("linear-probe", bb).fit(ds, ds)
    m.save_pretrained(tmp_path / "lp")
    m2 = load_method(tmp_path / "lp")  # rebuilds hf-clip from the saved config
    assert m2.backbone.name == "hf-clip"
    np.testing.assert_allclose(m.predict_proba(ds), m2.predict_proba(ds), atol=1e-5)


# ---- backbone.split: a frozen trunk and a trainable top of its own copies ---------------------------
TEXTS = ["a frog.", "a small red apple on a wooden table next to a blue cup", "x"]


@pytest.mark.parametrize("cut", [(0, 0), (1, 1), (1, None), (None, 1)])
def test_toy_split(toy, check_split, cut):
    if None in cut:
        split = toy.split(*cut)
        side = "image" if cut[0] is None else "text"
        with pytest.raises(ConfigError, match=f"no {side} top"):
            split.image_trunk(torch.rand(1, 3, 32, 32)) if side == "image" else split.text_trunk(["a"])
        return
    check_split(toy, cut, torch.rand(2, 3, 32, 32), TEXTS)


@pytest.mark.parametrize("cut", [(0, 0), (1, 1), (3, 6)])
def test_effnet_minilm_split(effnet, check_split, cut):
    from vlclassify.data import decode

    pixels = torch.stack([effnet.preprocess(decode(TUX_FROG)), torch.rand(3, 224, 224) * 2 - 1])
    split = check_split(effnet, cut, pixels, TEXTS)
    assert split.config() == {"image_blocks": cut[0], "text_layers": cut[1]}
    with pytest.raises(ConfigError, match=r"image_blocks must be an integer in 0..16"):
        effnet.split(17, 0)


@pytest.mark.parametrize("cut", [(0, 0), (1, 1), (2, 2)])
def test_hf_clip_split(tiny_clip, check_split, cut):
    folder, _ = tiny_clip
    bb = create_backbone("hf-clip", path=str(folder))
    check_split(bb, cut, torch.randn(2, 3, 32, 32), TEXTS)
    with pytest.raises(ConfigError, match=r"text_layers must be an integer in 0..2"):
        bb.split(0, 3)
