"""Shared fixtures: a tiny stand-in backbone, small on-disk datasets, an isolated cache."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlclassify.backbones import create_backbone
from vlclassify.features import FeatureCache

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def load_study(name: str):
    """A paper study of benchmarks/studies (scripts, not a package) as a module, to call its `main`."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "studies" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"study_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its worker processes find their functions by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["VLCLASSIFY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def cache(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache")


@pytest.fixture(scope="session")
def toy():
    return create_backbone("toy")


@pytest.fixture(scope="session")
def effnet():
    return create_backbone("effnet-minilm")


def make_color_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """One sub-folder per colour, noisy solid-colour PNGs: trivially separable classes."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLORS.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{name}_{i}.png")
    return root


@pytest.fixture
def color_folder(tmp_path) -> Path:
    return make_color_folder(tmp_path / "colors")


def _check_split(bb, cut, pixels, texts, atol=1e-5):
    """`bb.split(*cut)` recomputes encode_image / encode_text untrained, and training its top moves
    the top's own copies while the shared backbone stays as it was."""
    import torch

    split = bb.split(*cut)
    with torch.no_grad():
        f, t = bb.encode_image(pixels), bb.encode_text(texts)
        g = split.image_top(split.image_trunk(pixels))
        u = split.text_top(*split.text_trunk(texts))
    for a, b in ((f.embeds, g.embeds), (f.tokens, g.tokens), (f.pooled, g.pooled), (t.embeds, u.embeds)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    torch.testing.assert_close(t.tokens[t.mask], u.tokens[u.mask], atol=atol, rtol=0)
    assert g.grid == f.grid and torch.equal(t.mask, u.mask)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    top0 = {k: v.clone() for k, v in split.state_dict().items()}
    acts, (hidden, mask) = split.image_trunk(pixels), split.text_trunk(texts)
    opt = torch.optim.SGD(split.parameters(), lr=0.5)
    for _ in range(2):
        loss = split.image_top(acts).embeds.square().sum() + split.text_top(hidden, mask).embeds.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(top0[k], v) for k, v in split.state_dict().items())  # the top's copies moved...
    for k, v in bb.state_dict().items():
        assert torch.equal(before[k], v), k  # ...the shared backbone did not
    assert all(p.grad is None for p in bb.parameters())
    return split


@pytest.fixture
def check_split():
    return _check_split


@pytest.fixture
def tiny_clip(tmp_path):
    """(folder, model): a randomly initialised CLIP with a character-level tokenizer, saved like a real checkpoint."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    out = tmp_path / "tiny-clip"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model


@pytest.fixture
def encoder_calls(monkeypatch):
    """Every image-encoder call of feature extraction: a list of (encoder name, images in the batch)."""
    import vlclassify.features.extract as ex

    calls: list[tuple[str, int]] = []
    real = ex.make_encoder

    class Counting:
        def __init__(self, enc):
            self.enc, self.name = enc, enc.name

        def __call__(self, pixels, spatial=True):
            calls.append((self.name, pixels.shape[0]))
            return self.enc(pixels, spatial=spatial)

    monkeypatch.setattr(ex, "make_encoder", lambda *a, **k: Counting(real(*a, **k)))
    return calls
