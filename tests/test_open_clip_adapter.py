"""The open-clip backbone against a stand-in `open_clip` module with open_clip's public API.

open_clip itself pulls a CUDA torch build, so CI cannot install it; this checks our adapter's
use of that API (create_model_and_transforms, get_tokenizer, visual.output_tokens, ln_final) and
the split's use of the model's layers: a ViT image tower (conv1, class/positional embeddings,
ln_pre, transformer.resblocks, ln_post, proj, _global_pool) or a ModifiedResNet one (stem,
layer1-4, attnpool), and the CLIP text tower (token/positional embeddings, transformer.resblocks
under the causal attn_mask, ln_final, argmax pooling, text_projection). `batch_first=False`
builds the sequence-first layout of open_clip < 2.21."""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vlclassify.backbones import create_backbone
from vlclassify.errors import ConfigError

SOT, EOT, CONTEXT = 48, 49, 8  # open_clip: EOT is the largest id, ids are padded with 0 to the context length


class _Block(nn.Module):
    """open_clip's ResidualAttentionBlock (ln_1, attn, ln_2, mlp)."""

    def __init__(self, width, batch_first):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        y = self.ln_1(q_x)
        q_x = q_x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return q_x + self.mlp(self.ln_2(q_x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, batch_first):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, batch_first) for _ in range(layers))

    def forward(self, x, attn_mask=None):
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)
        return x


class _ViT(nn.Module):
    def __init__(self, width=12, dim=8, batch_first=True):
        super().__init__()
        self.image_size, self.output_tokens, self.pool_type, self.batch_first = 16, False, "tok", batch_first
        self.attn_pool, self.final_ln_after_pool = None, False
        self.conv1 = nn.Conv2d(3, width, kernel_size=8, stride=8)  # 2 x 2 patches
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(5, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = _Transformer(width, 2, batch_first)
        self.proj = nn.Parameter(torch.randn(width, dim))

    def _global_pool(self, x):
        return x[:, 0], x[:, 1:]

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, P, W]
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding
        x = self.ln_pre(x)
        x = self.transformer(x) if self.batch_first else self.transformer(x.transpose(0, 1)).transpose(0, 1)
        pooled, tokens = self._global_pool(self.ln_post(x))
        pooled = pooled @ self.proj
        return (pooled, tokens) if self.output_tokens else pooled


class _Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class _AttnPool(nn.Module):
    def __init__(self, c, dim):
        super().__init__()
        self.q, self.c_proj = nn.Linear(c, c), nn.Linear(c, dim)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # [N, hw, C]
        w = torch.softmax(self.q(t.mean(1, keepdim=True)) @ t.transpose(1, 2), -1)  # [N, 1, hw]
        return self.c_proj((w @ t)[:, 0])


class _ModifiedResNet(nn.Module):
    def __init__(self, c=6, dim=8):
        super().__init__()
        self.image_size = 16
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, stride=4, padding=1), nn.BatchNorm2d(c)
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(_Bottleneck(c)) for _ in range(3))
        self.layer4 = nn.Sequential(_Bottleneck(c), _Bottleneck(c))
        self.attnpool = _AttnPool(c, dim)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.attnpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


class _CLIP(nn.Module):
    def __init__(self, visual="vit", batch_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.visual = _ViT(batch_first=batch_first) if visual == "vit" else _ModifiedResNet()
        self.batch_first, self.text_pool_type = batch_first, "argmax"
        self.token_embedding = nn.Embedding(50, 12)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, 12) * 0.1)
        self.transformer = _Transformer(12, 2, batch_first)
        self.ln_final = nn.LayerNorm(12)
        self.text_projection = nn.Parameter(torch.randn(12, 8))
        self.register_buffer("attn_mask", torch.empty(CONTEXT, CONTEXT).fill_(float("-inf")).triu_(1), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(100.0), dtype=torch.float32))

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        if self.batch_first:
            x = self.transformer(x, attn_mask=self.attn_mask)
        else:
            x = self.transformer(x.transpose(0, 1), attn_mask=self.attn_mask).transpose(0, 1)
        x = self.ln_final(x)  # [N, L, W]
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection


class _Tokenizer:
    """open_clip's SimpleTokenizer contract: [N, context] ids, SOT ... EOT, zero padding, `decoder`."""

    decoder = {**{1 + i: chr(97 + i) for i in range(26)}, SOT: "<start_of_text>", EOT: "<end_of_text>"}

    def __call__(self, texts):
        out = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
        for r, t in enumerate(texts):
            ids = [SOT] + [1 + (ord(c) - 97) % 26 for c in t if c.isalpha()] + [EOT]
            if len(ids) > CONTEXT:
                ids = ids[:CONTEXT]
                ids[-1] = EOT
            out[r, : len(ids)] = torch.tensor(ids)
        return out


@pytest.fixture
def fake_open_clip(monkeypatch):
    mod = types.ModuleType("open_clip")

    def create_model_and_transforms(name, pretrained=None):
        if name not in ("Tiny", "TinyRN", "TinyOld"):
            raise RuntimeError(f"Model config for {name} not found.")

        def transform(im):
            return torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32) / 255).permute(2, 0, 1)  # noqa: E731

        model = _CLIP("resnet" if name == "TinyRN" else "vit", batch_first=name != "TinyOld")
        return model, None, transform

    mod.create_model_and_transforms, mod.get_tokenizer = create_model_and_transforms, lambda name: _Tokenizer()
    monkeypatch.setitem(sys.modules, "open_clip", mod)
    return mod


def _image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))


def test_open_clip_adapter_shapes_and_consistency(fake_open_clip):
    bb = create_backbone("open-clip", model="Tiny")
    assert bb.embed_dim == 8 and bb.image_size == 16 and abs(bb.logit_scale - 100) < 1e-3
    with torch.no_grad():
        f = bb.encode_image(bb.preprocess(_image())[None])
        t = bb.encode_text(["ab", "abcd"])
    assert f.tokens.shape == (1, 4, 8) and f.grid == (2, 2)
    # SOT + letters + EOT, cut after the longest text
    assert t.tokens.shape == (2, 6, 8) and t.mask.sum(1).tolist() == [4, 6]
    assert torch.allclose(t.tokens[1, 5], t.embeds[1], atol=1e-5)  # the EOT token's projected feature
    assert torch.allclose(t.tokens[0, 3], t.embeds[0], atol=1e-5)
    assert t.token_strings[0] == ["<start_of_text>", "a", "b", "<end_of_text>", "", ""]


def test_open_clip_truncation_keeps_the_eot_token(fake_open_clip):
    bb = create_backbone("open-clip", model="Tiny")
    ids = bb.tokenize(["abcdefgh", "ab"], max_tokens=4)
    assert ids["input_ids"][0, :4].tolist() == [SOT, 1, 2, EOT] and ids["input_ids"][0, 4:].sum() == 0
    assert ids["attention_mask"].sum(1).tolist() == [4, 4]
    assert bb.token_strings(["abcdefgh"], max_tokens=4) == [["<start_of_text>", "a", "b", "<end_of_text>"]]


@pytest.mark.parametrize("model", ["Tiny", "TinyOld", "TinyRN"])
@pytest.mark.parametrize("cut", [(0, 0), (1, 1), (2, 2)])
def test_open_clip_split_recomputes_the_encoders_and_trains_a_copy(fake_open_clip, check_split, model, cut):
    bb = create_backbone("open-clip", model=model)
    pixels = torch.stack([bb.preprocess(_image()), torch.rand(3, 16, 16)])
    check_split(bb, cut, pixels, ["a frog", "abc", "a much longer text"])


@pytest.mark.parametrize("model", ["Tiny", "TinyRN"])
def test_open_clip_bridge_is_exact(fake_open_clip, model):
    """The bridge (pooled -> joint) reproduces the embedding to 1e-5: the joint-space methods'
    bridged forms start exactly at this backbone's zero-shot."""
    bb = create_backbone("open-clip", model=model)
    w, b = bb.bridge()
    assert w.shape == (bb.embed_dim, bb.pooled_dim) and b.shape == (bb.embed_dim,)
    with torch.no_grad():
        f = bb.encode_image(torch.stack([bb.preprocess(_image()), torch.rand(3, 16, 16)]))
    assert torch.allclose(f.pooled @ w.T + b, f.embeds, atol=1e-5)


def test_open_clip_split_refuses_what_it_cannot_reproduce(fake_open_clip):
    bb = create_backbone("open-clip", model="Tiny")
    with pytest.raises(ConfigError, match="image_blocks must be an integer in 0..2"):
        bb.split(3, 0)
    bb.model.text_pool_type = "last"
    with pytest.raises(ConfigError, match="not 'last'"):
        bb.split(0, 1)
    bb.model.visual.attn_pool = nn.Identity()
    with pytest.raises(ConfigError, match="attentional pooling"):
        bb.split(1, None)


def test_open_clip_errors(fake_open_clip, monkeypatch):
    with pytest.raises(ConfigError, match="cannot build 'Nope'"):
        create_backbone("open-clip", model="Nope")
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ConfigError, match="optional extra"):
        create_backbone("open-clip", model="Tiny")
