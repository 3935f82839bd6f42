"""Shared fixtures: a tiny stand-in backbone, small on-disk datasets, an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlclassify.backbones import create_backbone
from vlclassify.features import FeatureCache

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


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
