"""The method contract, over every registered method (timm's one-test-for-every-model habit).

`vlclassify.testing.check_method` runs, for each method, the checks its declarations and tags call
for: every data kind on the toy backbone (fit, predict, save / load with equal scores, or the
one-line refusal before any image is decoded), the declared score activation, and update / explain
/ ONNX export / streaming / names-only where tagged. A new method is covered the moment it is
registered: FAST only shortens budgets, a method missing from it runs with its defaults. Every
registered backbone encodes a tiny input here too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_open_clip_adapter import fake_open_clip  # noqa: F401 -- the open-clip stand-in, a fixture
from vlclassify.backbones import create_backbone, list_backbones
from vlclassify.data import load_data
from vlclassify.methods import METHODS, create_method, list_methods
from vlclassify.methods.base import MULTI, SINGLE, TrainOptions
from vlclassify.testing import KINDS as KIND_NAMES
from vlclassify.testing import check_method, write_manifest

FAST = {  # shorter budgets for a quick suite; every other option is the method's default
    "cmm": {"steps": 40},
    "vt-clip": {"steps": 12, "eval_every": 4},
    "tip-adapter-f": {"epochs": 3},
    "cross-modal-linear-probe": {"steps": 12, "eval_every": 4},
    "cma-clip": {"frozen_epochs": 2, "e2e_epochs": 1, "tune_epochs": 1, "width": 32, "head_hidden": 16},
    "dicls": {"epochs": 2, "dim": 16},
    "icar": {"image_epochs": 1, "joint_epochs": 1, "min_steps_per_epoch": 2},
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {k: load_data(str(write_manifest(root / k, k))) for k in KIND_NAMES}


def make(name, toy, cache=None, **extra):
    return create_method(name, toy, **{**FAST.get(name, {}), **extra})


@pytest.mark.parametrize("name", list_methods())
def test_every_method_passes_check_method(name):
    ran = check_method(METHODS.get(name), FAST.get(name, {}))
    cls = METHODS.get(name)
    assert len([r for r in ran if r.startswith(("fits", "refuses"))]) == len(KIND_NAMES)
    for tag in ("update", "explain", "onnx", "stream", "names_only"):
        assert (tag in ran) == getattr(cls.tags, tag), (name, tag, ran)
    assert any(r.startswith("fits") for r in ran) and ((SINGLE in cls.kinds) or (MULTI in cls.kinds))


def _tiny_clip_backbone(request):
    folder, _ = request.getfixturevalue("tiny_clip")
    return create_backbone("hf-clip", path=str(folder))


BACKBONES = {  # how the suite builds each registered backbone without downloading weights
    "toy": lambda request: create_backbone("toy"),
    "effnet-minilm": lambda request: request.getfixturevalue("effnet"),
    "hf-clip": _tiny_clip_backbone,  # a random tiny CLIP saved like a checkpoint (conftest.py)
    "open-clip": lambda request: (
        request.getfixturevalue("fake_open_clip"),
        create_backbone("open-clip", model="Tiny"),
    )[1],
}


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_encodes_images_and_texts(name, request):
    assert name in BACKBONES, f"add a stand-in for backbone {name!r} to BACKBONES"
    bb = BACKBONES[name](request)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 28, 3), dtype=np.uint8))
    with torch.no_grad():
        f = bb.encode_image(
            torch.stack([bb.preprocess(im), bb.preprocess(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
        )
        t = bb.encode_texts_normalized(["a red square", "a cat"], 2)
    assert f.embeds.shape == (2, bb.embed_dim) and f.pooled.shape == (2, bb.pooled_dim)
    assert f.tokens.shape[0] == 2 and f.tokens.shape[-1] == bb.embed_dim
    assert t.shape == (2, bb.embed_dim) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert all(bool(torch.isfinite(x).all()) for x in (f.embeds, f.pooled, f.tokens, t))


@pytest.mark.parametrize("name", list_methods())
def test_every_method_declares_its_contract(name, toy):
    cls = type(create_method(name, toy))
    from vlclassify.methods.base import FEATURES, KINDS

    assert cls.kinds and cls.kinds <= set(KINDS) and (SINGLE in cls.kinds or MULTI in cls.kinds)
    assert cls.needs and cls.needs <= set(FEATURES)
    assert (cls.__doc__ or "").strip(), "a one-line description for `vlclassify methods`"


TRAINABLE = [n for n in list_methods() if issubclass(METHODS.get(n).Config, TrainOptions)]  # declared training


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_trainable_method_resumes_after_a_kill(name, toy, cache, datasets, tmp_path, monkeypatch):
    from vlclassify.training import Trainer

    train, val, test = (datasets["single"][s] for s in ("train", "val", "test"))
    ref = make(name, toy, cache, run_dir=str(tmp_path / "ref")).fit(train, val)

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed  # the first finished round of the first training run: as if the process died there

    real_init = Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.callbacks.append(kill)

    monkeypatch.setattr(Trainer, "__init__", init)
    with pytest.raises(Killed):
        make(name, toy, cache, run_dir=str(tmp_path / "run")).fit(train, val)
    monkeypatch.setattr(Trainer, "__init__", real_init)
    again = make(name, toy, cache, run_dir=str(tmp_path / "run")).fit(train, val)
    np.testing.assert_allclose(again.predict_proba(test), ref.predict_proba(test), atol=1e-6)


def test_every_trainable_method_under_torchrun_matches_one_process(datasets, tmp_path):
    """2 processes (CPU, gloo), the same global batch split across them: the same validation accuracy
    as one process, and scores within 0.02 (the ranks' partial means are summed in another order,
    and a batch whose rows do not split evenly weighs its halves slightly differently)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("ddp_fit.py")
    manifest = write_manifest(tmp_path / "data", "single")
    env = {**os.environ, "VLCLASSIFY_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    opts = json.dumps({n: FAST.get(n, {}) for n in TRAINABLE})
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(script), str(manifest), opts, str(one)], check=True, env=env, timeout=600)
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(manifest), opts, str(two)],
        check=True,
        env=env,
        timeout=600,
    )
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert set(a) == set(b) == set(TRAINABLE)
    for name in TRAINABLE:
        assert b[name]["world"] == 2 and a[name]["world"] == 1
        assert abs(a[name]["val_accuracy"] - b[name]["val_accuracy"]) <= 1e-9, name
        assert np.abs(np.array(a[name]["probs"]) - np.array(b[name]["probs"])).max() < 0.02, name


def test_the_contract_page_is_generated_from_the_declarations():
    from pathlib import Path

    from vlclassify.methods.registry import contract_table

    page = (Path(__file__).parent.parent / "docs" / "methods.md").read_text()
    start = page.index("<!-- contract table")
    table = page[page.index("\n", start) + 1 : page.index("<!-- end of the contract table")]
    assert table.strip() == contract_table().strip(), "regenerate docs/methods.md: vlclassify methods --contract"


def test_the_worked_example_of_docs_extending_passes_check_method():
    """docs/examples/nearest_mean.py, the one-file method docs/extending.md walks through."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parent.parent / "docs" / "examples" / "nearest_mean.py"
    spec = importlib.util.spec_from_file_location("nearest_mean", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nearest_mean"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)  # registers "nearest-mean"
    try:
        ran = check_method(module.NearestMean)
        assert "onnx" in ran and "refuses multi" in ran and "fits single" in ran
        assert check_method(module.NearestMean, {"feature": "image", "temperature": 0.1})
    finally:
        METHODS.unregister("nearest-mean")
        del sys.modules["nearest_mean"]
    assert "nearest-mean" not in list_methods()
