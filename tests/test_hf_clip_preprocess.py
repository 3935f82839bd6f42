"""hf-clip preprocessing equals transformers' CLIPImageProcessor (its PIL implementation) on real
images: odd sizes, grey, palette and RGBA Tux Paint stamps (transparency composited on white)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlclassify.backbones import create_backbone
from vlclassify.data import decode
from vlclassify.errors import ConfigError

STAMPS = Path("/usr/share/tuxpaint/stamps")
REAL = [  # (file, mode it is stored in)
    ("symbols/clockface.png", "RGBA"),  # 300x301
    ("symbols/recycle.png", "P"),  # palette with a transparent colour, 150x151
    ("symbols/money/us/coins/005nickel.png", "LA"),  # grey + alpha, 64x64: upscaled
    ("town/roadsigns/stoplight_03_green.png", "P"),  # palette, no transparency, 80x162
    ("seasonal/easter/chick-hatched.png", "RGB"),  # RGB with a transparent colour (tRNS), 215x236
]


def _processor_class():
    from transformers import CLIPImageProcessor

    try:  # transformers >= 5: CLIPImageProcessor is the torchvision backend when torchvision is installed
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        return CLIPImageProcessor


def _tiny_clip(folder: Path, image_size: int, patch: int, processor: dict | None):
    """A random CLIP with a character tokenizer, saved like a real checkpoint (+ a preprocessor config)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, **small),
        vision_config=dict(image_size=image_size, patch_size=patch, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    if processor is not None:
        _processor_class()(**processor).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip224(tmp_path_factory):
    """CLIP's own preprocessing: short side 224, 224 crop, CLIP mean/std."""
    folder = tmp_path_factory.mktemp("clip224")
    return _tiny_clip(folder, 224, 32, {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}})


@pytest.fixture(scope="module")
def test_images(tmp_path_factory) -> list[Path]:
    """The real stamps, plus a grey photo and odd sizes cut from them."""
    d = tmp_path_factory.mktemp("imgs")
    paths = [STAMPS / f for f, _ in REAL]
    for (_, mode), p in zip(REAL, paths):
        if not p.is_file():
            pytest.skip(f"{p}: tuxpaint-stamps-default not installed")
        assert Image.open(p).mode == mode
    clock = Image.open(paths[0])
    clock.convert("L").resize((333, 97), Image.BICUBIC).save(d / "grey_333x97.png")  # grey, wide, odd
    clock.crop((3, 5, 244, 300)).save(d / "rgba_241x295.png")  # odd sizes, tall, with alpha
    clock.convert("RGB").resize((225, 1001)).save(d / "rgb_225x1001.jpg", quality=90)  # one pixel above the crop
    Image.open(paths[1]).resize((17, 23), Image.NEAREST).save(d / "palette_17x23.png", transparency=0)
    return paths + sorted(d.iterdir())


def _max_diff(bb, processor, path) -> float:
    ours = bb.preprocess(decode(str(path))).numpy()  # what a user gets: decode, then preprocess
    with Image.open(path) as im:
        ref = processor(images=im, return_tensors="np")["pixel_values"][0]
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max())


def test_equals_clip_image_processor_on_real_images(clip224, test_images):
    bb = create_backbone("hf-clip", path=str(clip224))
    processor = _processor_class().from_pretrained(clip224)
    diffs = {p.name: _max_diff(bb, processor, p) for p in test_images}
    assert max(diffs.values()) <= 1e-5, diffs


def test_same_image_features_as_the_model_on_the_processors_pixels(clip224, test_images):
    from transformers import CLIPModel

    bb = create_backbone("hf-clip", path=str(clip224))
    processor = _processor_class().from_pretrained(clip224)
    model = CLIPModel.from_pretrained(clip224).eval()
    ours = torch.stack([bb.preprocess(decode(str(p))) for p in test_images])
    with Image.open(test_images[0]) as a, Image.open(test_images[-1]) as b:
        ref_px = torch.from_numpy(processor(images=[a, b], return_tensors="np")["pixel_values"])
    with torch.inference_mode():
        got = bb.encode_image(ours[[0, -1]]).embeds
        ref = model.get_image_features(pixel_values=ref_px)
        ref = ref if torch.is_tensor(ref) else ref.pooler_output
    assert (got - ref).abs().max() <= 1e-5


def test_preprocessor_config_is_honoured_and_defaults_are_clips(tmp_path, test_images):
    custom = {"size": {"shortest_edge": 80}, "crop_size": 64, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    folder = _tiny_clip(tmp_path / "custom", 64, 16, custom)
    bb = create_backbone("hf-clip", path=str(folder))
    processor = _processor_class().from_pretrained(folder)
    assert max(_max_diff(bb, processor, p) for p in test_images) <= 1e-5
    bare = _tiny_clip(tmp_path / "bare", 64, 16, None)  # no preprocessor_config.json: CLIP's recipe at the model's size
    bb = create_backbone("hf-clip", path=str(bare))
    processor = _processor_class()(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    assert max(_max_diff(bb, processor, p) for p in test_images) <= 1e-5
    assert bb.preprocess_config()["recipe"] == "CLIPImageProcessor"


def test_a_crop_the_model_cannot_take_is_named(tmp_path):
    folder = _tiny_clip(tmp_path / "m", 64, 16, {"size": {"shortest_edge": 64}, "crop_size": 48})
    with pytest.raises(ConfigError, match=r"images would be \(48, 48\) pixels but the model takes 64x64"):
        create_backbone("hf-clip", path=str(folder))
