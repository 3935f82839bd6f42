"""The fast extraction paths give the plain eager features; the optional ONNX Runtime path falls back.

Real default backbone on a few real images (Tux Paint photos, Fashion-MNIST arrays). Speed itself
is measured by benchmarks/speed/extract_throughput.py, not here.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlclassify.data import decode, fashion_mnist, tuxpaint
from vlclassify.data.items import Dataset
from vlclassify.errors import ConfigError
from vlclassify.features import FeatureCache, extract_features, runtime


@pytest.fixture(scope="module")
def real_images() -> Dataset:
    tux = tuxpaint()["all"]
    fm = fashion_mnist()["test"]
    items = [tux.items[i] for i in (0, 120, 250, 400)] + fm.items[:2]
    return Dataset(items=items, classnames=tux.classnames, name="speed-paths", source="tux+fm")


@pytest.fixture(scope="module")
def eager(effnet, real_images):
    """The plain path: sequential preprocess, eager encode_image under no_grad, no folding."""
    with torch.no_grad():
        x = torch.stack([effnet.preprocess(decode(it)) for it in real_images.items])
        return effnet.encode_image(x)


def _close(fs, ref, spatial=True):
    assert torch.allclose(fs.image, ref.embeds, atol=1e-5, rtol=1e-4)
    assert torch.allclose(fs.pooled, ref.pooled, atol=1e-4, rtol=1e-4)
    if spatial:
        # spatial tokens are stored as float16: its rounding (~1e-4 at this scale) dominates
        assert fs.grid == (7, 7) and fs.spatial.shape == ref.tokens.shape
        assert torch.allclose(fs.spatial.float(), ref.tokens, atol=2e-4)


@pytest.mark.parametrize("rt", ["torch", "onnx"])
def test_runtime_matches_eager(effnet, real_images, eager, rt):
    fs = extract_features(
        effnet,
        real_images,
        spatial=True,
        text=False,
        cache=FeatureCache(enabled=False),
        progress=False,
        runtime=rt,
        batch_size=4,
    )
    _close(fs, eager)


def test_auto_uses_onnx_and_keys_the_cache_by_runtime(effnet, real_images, eager, tmp_path, encoder_calls):
    cache = FeatureCache(tmp_path)
    kw = dict(spatial=True, text=False, cache=cache, progress=False)
    _close(extract_features(effnet, real_images, **kw), eager)
    assert {name for name, _ in encoder_calls} == {"onnx"}
    extract_features(effnet, real_images, runtime="torch", **kw)  # the onnx rows are not reused for torch
    assert {name for name, _ in encoder_calls} == {"onnx", "torch"}
    n = len(encoder_calls)
    extract_features(effnet, real_images, runtime="onnx", **kw)
    extract_features(effnet, real_images, **kw)
    assert len(encoder_calls) == n  # both runtimes' rows now hit


def test_fallback_without_onnxruntime(effnet, real_images, eager, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert not runtime.onnxruntime_available()
    assert runtime.resolve_runtime(effnet, "auto") == "torch"
    assert runtime.make_encoder(effnet).name == "torch"
    fs = extract_features(
        effnet, real_images, spatial=True, text=False, cache=FeatureCache(enabled=False), progress=False
    )
    _close(fs, eager)
    with pytest.raises(ConfigError, match="needs onnxruntime"):
        extract_features(effnet, real_images, cache=FeatureCache(enabled=False), progress=False, runtime="onnx")


def test_failed_export_falls_back_for_auto_only(effnet, tmp_path, monkeypatch, caplog):
    def broken(bb, path):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(runtime, "export_onnx_trunk", broken)
    with caplog.at_level(logging.WARNING):
        assert runtime.make_encoder(effnet, "auto", tmp_path).name == "torch"
    assert "exporter broke" in caplog.text
    with pytest.raises(RuntimeError, match="exporter broke"):
        runtime.make_encoder(effnet, "onnx", tmp_path)


def test_damaged_onnx_file_is_exported_again(effnet, real_images, eager, tmp_path, monkeypatch):
    good = runtime.onnx_trunk_path(effnet)  # exported by the tests above into the session cache
    if not good.exists():
        runtime.export_onnx_trunk(effnet, good)
    bad = runtime.onnx_trunk_path(effnet, tmp_path)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an onnx model")
    exported = []
    monkeypatch.setattr(runtime, "export_onnx_trunk", lambda bb, p: exported.append(p) or shutil.copy(good, p))
    enc = runtime.OnnxEncoder(effnet, tmp_path)
    assert exported == [bad]
    x = torch.stack([effnet.preprocess(decode(it)) for it in real_images.items])
    assert torch.allclose(enc(x).embeds, eager.embeds, atol=1e-5, rtol=1e-4)


def test_spatial_false_skips_the_cell_head(effnet, real_images, eager):
    fs = extract_features(
        effnet,
        real_images,
        spatial=False,
        text=False,
        cache=FeatureCache(enabled=False),
        progress=False,
        runtime="torch",
    )
    assert fs.spatial is None
    _close(fs, eager, spatial=False)


def test_backbone_without_trunk(toy, color_folder):
    from vlclassify.data import load_data

    ds = load_data(str(color_folder))
    ds = ds["all"] if isinstance(ds, dict) else ds
    assert runtime.resolve_runtime(toy, "auto") == "torch"
    with pytest.raises(ConfigError, match="no separable image trunk"):
        runtime.resolve_runtime(toy, "onnx")
    with pytest.raises(ConfigError, match="runtime must be one of"):
        runtime.resolve_runtime(toy, "tensorrt")
    fs = extract_features(toy, ds, spatial=True, text=False, cache=FeatureCache(enabled=False), progress=False)
    with torch.no_grad():
        ref = toy.encode_image(torch.stack([toy.preprocess(decode(it)) for it in ds.items]))
    assert torch.allclose(fs.image, ref.embeds, atol=1e-5)


def test_numpy_preprocess_is_bit_identical_to_the_torch_formula(effnet, real_images):
    for it in real_images.items:
        im = decode(it)
        w, h = im.size
        s = 224 / min(w, h)
        nw, nh = max(224, round(w * s)), max(224, round(h * s))
        crop = im.resize((nw, nh), Image.BICUBIC).crop(
            ((nw - 224) // 2, (nh - 224) // 2, (nw - 224) // 2 + 224, (nh - 224) // 2 + 224)
        )
        old = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        old = old.mul_(2.0).sub_(1.0)
        new = effnet.preprocess(im)
        assert new.is_contiguous() and torch.equal(new, old)


def test_topk_join_equals_the_dense_formula_values_and_gradients(effnet):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 1000, generator=g)).requires_grad_()
    k, t = effnet.options["topk"], effnet.options["temperature"]

    def dense(lg):
        probs = torch.softmax(lg / t, dim=-1)
        top = probs.topk(k, dim=-1)
        probs = torch.zeros_like(probs).scatter_(-1, top.indices, top.values)
        return (probs / probs.sum(-1, keepdim=True)) @ effnet.class_text

    w = torch.randn(2, 5, effnet.embed_dim, generator=g)
    a = effnet._to_text_space(logits)
    (ga,) = torch.autograd.grad((a * w).sum(), logits)
    b = dense(logits)
    (gb,) = torch.autograd.grad((b * w).sum(), logits)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(ga, gb, atol=1e-5)
    assert torch.allclose(F.normalize(a, dim=-1), F.normalize(b, dim=-1), atol=1e-6)


def test_cli_extract_runtime_option(color_folder, tmp_path):
    from typer.testing import CliRunner

    from vlclassify.cli import app

    args = ["extract", "-d", str(color_folder), "--backbone", "toy", "--cache-dir", str(tmp_path)]
    r = CliRunner().invoke(app, args + ["--runtime", "torch"])
    assert r.exit_code == 0, r.output
    assert "image (18, 16)" in r.output
    r = CliRunner().invoke(app, args + ["--runtime", "onnx"])
    assert r.exit_code != 0 and isinstance(r.exception, ConfigError) and "no separable image trunk" in str(r.exception)


def test_flipped_bytes_in_a_cached_export_are_caught_and_nothing_stale_stays(
    effnet, real_images, eager, tmp_path, caplog
):
    """A damaged export that still loads gives wrong features silently; the digest recorded at
    export catches it, and the session of the damaged bytes is never reused."""
    x = torch.stack([effnet.preprocess(decode(it)) for it in real_images.items])
    path = runtime.onnx_trunk_path(effnet, tmp_path)
    first = runtime.OnnxEncoder(effnet, tmp_path)
    assert torch.allclose(first(x).embeds, eager.embeds, atol=1e-5, rtol=1e-4)
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2  # inside the weights: the file still loads, its features move
    raw[mid : mid + 64] = bytes(b ^ 0x5A for b in raw[mid : mid + 64])
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        again = runtime.OnnxEncoder(effnet, tmp_path)
    assert "does not match the SHA-256 recorded at export" in caplog.text
    assert path.read_bytes() != bytes(raw)  # exported afresh
    assert torch.allclose(again(x).embeds, eager.embeds, atol=1e-5, rtol=1e-4)
