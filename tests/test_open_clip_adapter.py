"""The open-clip backbone against a stand-in `open_clip` module with open_clip's public API.

open_clip itself pulls a CUDA torch build, so CI cannot install it; this checks our adapter's
use of that API (create_model_and_transforms, get_tokenizer, visual.output_tokens, ln_final)."""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vlclassify.backbones import create_backbone
from vlclassify.errors import ConfigError


class _Visual(nn.Module):
    def __init__(self, width=12, dim=8, grid=2):
        super().__init__()
        self.image_size, self.grid, self.output_tokens = 16, grid, False
        self.patch = nn.Linear(3, width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, dim))

    def forward(self, x):
        cells = nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # [N, P, 3]
        tokens = self.ln_post(self.patch(cells))
        pooled = tokens.mean(1) @ self.proj
        return (pooled, tokens) if self.output_tokens else pooled


class _CLIP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.visual = _Visual()
        self.token_embedding = nn.Embedding(50, 12)
        self.ln_final = nn.LayerNorm(12)
        self.text_projection = nn.Parameter(torch.randn(12, 8))
        self.logit_scale = nn.Parameter(torch.tensor(np.log(100.0), dtype=torch.float32))

    def encode_text(self, ids):
        x = self.ln_final(self.token_embedding(ids))  # [N, L, W]
        eos = (ids != 0).sum(1) - 1
        return x[torch.arange(len(ids)), eos] @ self.text_projection


@pytest.fixture
def fake_open_clip(monkeypatch):
    mod = types.ModuleType("open_clip")

    def create_model_and_transforms(name, pretrained=None):
        if name != "Tiny":
            raise RuntimeError(f"Model config for {name} not found.")

        def transform(im):
            return torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32) / 255).permute(2, 0, 1)  # noqa: E731

        return _CLIP(), None, transform

    def get_tokenizer(name):
        return lambda texts: torch.tensor([[1 + (ord(c) % 40) for c in t[:6]] + [0] * (6 - len(t[:6])) for t in texts])

    mod.create_model_and_transforms, mod.get_tokenizer = create_model_and_transforms, get_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", mod)
    return mod


def test_open_clip_adapter_shapes_and_consistency(fake_open_clip):
    bb = create_backbone("open-clip", model="Tiny")
    assert bb.embed_dim == 8 and bb.image_size == 16 and abs(bb.logit_scale - 100) < 1e-3
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    with torch.no_grad():
        f = bb.encode_image(bb.preprocess(img)[None])
        t = bb.encode_text(["ab", "abcd"])
    assert f.tokens.shape == (1, 4, 8) and f.grid == (2, 2)
    assert torch.allclose(f.tokens.mean(1), f.embeds, atol=1e-5)  # projected tokens match the pooled path
    assert t.tokens.shape == (2, 6, 8) and t.mask.sum(1).tolist() == [2, 4]
    assert torch.allclose(t.tokens[1, 3], t.embeds[1], atol=1e-5)  # the EOS token's projected feature


def test_open_clip_errors(fake_open_clip, monkeypatch):
    with pytest.raises(ConfigError, match="cannot build 'Nope'"):
        create_backbone("open-clip", model="Nope")
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ConfigError, match="optional extra"):
        create_backbone("open-clip", model="Tiny")
