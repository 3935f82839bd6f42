"""`check_method(cls)`: the method contract, checked on tiny data (as scikit-learn's `check_estimator`).

    from vlclassify.testing import check_method
    check_method(MyMethod, options={"epochs": 1})   # raises AssertionError naming the failed check

Which checks run comes from the class's declarations and tags, so a user's own method is checked
the same way as the registered ones (tests/test_contract.py runs every registered method):

- every data kind (single-label, multi-label, image + text, two tasks) on the toy backbone: a kind
  the method does not take is refused in one line *before any image is decoded*, naming the methods
  that take it; a kind it takes fits, predicts ([N, C] finite scores, decisions, per-item results),
  says what it ignored, and survives save_pretrained / load_method with equal scores;
- the scores are the declared activation of the logits (softmax rows sum to 1);
- `update`: adding examples grows the model in place (no refit); `explain`: a finite 2-D map;
  `onnx`: the exported graph matches predict_proba; `stream`: a streamed fit equals the in-memory
  one; `names_only`: a fit from class names decodes no image.

The method must be registered (`@register_method`): load_method finds a saved model's class by name.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import create_backbone
from .backbones.base import Backbone
from .context import RunContext
from .data import load_data
from .data.items import Item
from .errors import VLClassifyError
from .features import FeatureCache
from .methods.base import METHODS, MULTI, SINGLE, TASKS, TEXT, Method, load_method, methods_taking

KINDS = ("single", "multi", "text", "tasks")
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHADES = {"red": "warm", "green": "cold", "blue": "cold"}


def write_image(path: Path, left: str, right: str | None = None, seed: int = 0) -> None:
    """A noisy 24 x 24 square of colour `left` (its right half `right`), saved to `path`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.zeros((24, 24, 3), dtype=np.float64)
    arr[:, :12] = COLORS[left]
    arr[:, 12:] = COLORS[right or left]
    Image.fromarray(np.clip(arr + rng.normal(0, 15, arr.shape), 0, 255).astype(np.uint8)).save(path)


def write_manifest(root: Path, kind: str) -> Path:
    """A small CSV of `kind` (single, multi, text, tasks): 3 colours, 8 images each (train 4 / val 2 / test 2)."""
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    names = list(COLORS)
    for ci, c in enumerate(names):
        for i in range(8):
            split = "train" if i < 4 else ("val" if i < 6 else "test")
            p = root / f"{c}_{i}.png"
            if kind == "multi":
                other = names[(ci + 1 + i % 2) % 3]
                write_image(p, c, other if i % 3 else None, seed=ci * 10 + i)
                labels = sorted({c, other}) if i % 3 else [c]
                rows.append({"image": p.name, "labels": ",".join(labels), "split": split})
            else:
                write_image(p, c, None, seed=ci * 10 + i)
                row = {"image": p.name, "split": split}
                if kind == "tasks":
                    row.update({"color": c, "shade": SHADES[c]})
                else:
                    row["label"] = c
                if kind == "text":
                    row["text"] = f"a {c} square" if i % 4 else "a square"
                rows.append(row)
    path = root / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@contextmanager
def _decodes(bb: Backbone) -> Iterator[list[int]]:
    """Count the images `bb` preprocesses in the block (any extraction decodes and preprocesses)."""
    seen: list[int] = []
    real = bb.preprocess

    def counting(im: Any) -> torch.Tensor:
        seen.append(1)
        return real(im)

    setattr(bb, "preprocess", counting)  # noqa: B010 -- an instance patch, removed below
    try:
        yield seen
    finally:
        delattr(bb, "preprocess")


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


class _Checker:
    """The checks of one method class on one toy backbone and cache."""

    def __init__(self, cls: type[Method], backbone: Backbone, options: dict[str, Any], root: Path) -> None:
        self.cls, self.bb, self.options, self.root = cls, backbone, options, root
        self.ctx = RunContext(cache=FeatureCache(root / "cache"), progress=False)
        self.data = {k: load_data(str(write_manifest(root / k, k))) for k in KINDS}
        self.ran: list[str] = []

    def make(self, **extra: Any) -> Method:
        return self.cls(self.bb, **{**self.options, **extra})

    def takes(self, m: Method, kind: str) -> bool:
        return (MULTI if self.data[kind]["train"].multilabel else SINGLE) in m.takes()

    def kinds(self, m: Method) -> None:
        for kind in KINDS:
            if self.takes(m, kind):
                self.fit_predict_roundtrip(kind)
            else:
                self.refusal(kind)

    def refusal(self, kind: str) -> None:
        """A kind not taken: one line, before any image is decoded, naming the methods that take it."""
        train, val = self.data[kind]["train"], self.data[kind]["val"]
        label = MULTI if train.multilabel else SINGLE
        with _decodes(self.bb) as decoded:
            try:
                self.make().fit(train, val, ctx=self.ctx)
            except VLClassifyError as e:
                msg = str(e)
                _check("\n" not in msg and "does not take" in msg, f"{kind}: the refusal is one line naming it: {msg}")
                missing = [n for n in methods_taking(label) if n not in msg]
                _check(not missing, f"{kind}: the refusal names every method that takes {label} data ({missing})")
            else:
                raise AssertionError(f"{kind}: {self.cls.name} does not take {label} data but fitted it")
        _check(not decoded, f"{kind}: the refusal came after images were decoded")
        self.ran.append(f"refuses {kind}")

    def fit_predict_roundtrip(self, kind: str) -> None:
        splits = self.data[kind]
        train, val, test = splits["train"], splits["val"], splits["test"]
        m = self.make().fit(train, val, ctx=self.ctx)
        _check(isinstance(m.head, torch.nn.Module), f"{kind}: fit builds a head module")
        n, c = len(test), train.num_classes
        p = m.predict_proba(test, ctx=self.ctx)
        _check(p.shape == (n, c) and bool(np.isfinite(p).all()), f"{kind}: predict_proba gives finite [N, C] scores")
        z = m.logits(test, ctx=self.ctx).float()
        act = torch.sigmoid(z) if m.activation == "sigmoid" else torch.softmax(z, -1)
        _check(np.allclose(p, act.numpy(), atol=1e-6), f"{kind}: scores are the declared {m.activation} of the logits")
        decided = m.predict(test, ctx=self.ctx)
        _check(decided.shape == ((n, c) if m.multilabel else (n,)), f"{kind}: predict gives decisions per item")
        results = m.predict_results(test, top=2, ctx=self.ctx)
        _check(len(results) == n and len(results[0].scores) == 2, f"{kind}: predict_results gives the top scores")
        _check(results[0].scores[0][1] >= results[0].scores[1][1], f"{kind}: top scores come best first")
        if kind == "tasks" and TASKS in m.takes():
            _check(len(results[0].tasks) == len(train.tasks), f"{kind}: every task column is answered")
        ignored = " ".join(m.fit_info.get("ignored", []))
        if kind == "tasks" and TASKS not in m.takes():
            _check("shade" in ignored, f"{kind}: fit says the extra task is ignored")
        if kind == "text" and TEXT not in m.takes():
            _check("texts are ignored" in ignored, f"{kind}: fit says the texts are ignored")
        path = self.root / f"model-{kind}"
        m.save_pretrained(path)
        again = load_method(path, backbone=self.bb)
        _check(
            np.allclose(again.predict_proba(test, ctx=self.ctx), p, atol=1e-6), f"{kind}: a saved model scores the same"
        )
        _check(
            [r.to_dict() for r in again.predict_results(test, top=2, ctx=self.ctx)] == [r.to_dict() for r in results],
            f"{kind}: a saved model predicts the same",
        )
        self.ran.append(f"fits {kind}")

    def update(self) -> None:
        """Tagged `update`: new examples are added to the fitted model, not refitted from scratch."""
        splits = self.data["single"]
        m = self.make().fit(splits["train"], splits["val"], ctx=self.ctx)
        m.update(splits["val"], ctx=self.ctx)
        how = m.fit_info["update"]["how"]
        _check("refit from scratch" not in how, f"update: tagged update but refitted ({how})")
        p = m.predict_proba(splits["test"], ctx=self.ctx)
        _check(bool(np.isfinite(p).all()), "update: the updated model predicts")
        self.ran.append("update")

    def explain(self) -> None:
        """Tagged `explain`: a finite 2-D map for an image (and its text when the method reads texts)."""
        m0 = self.make()
        kind = "text" if TEXT in m0.takes() else "single"
        splits = self.data[kind]
        m = m0.fit(splits["train"], splits["val"], ctx=self.ctx)
        item: Item = splits["test"].items[-1]
        heat = np.asarray(m.explain(item, ctx=self.ctx))
        _check(heat.ndim == 2 and bool(np.isfinite(heat).all()), "explain: a finite [h, w] map")
        self.ran.append("explain")

    def onnx(self) -> None:
        """Tagged `onnx`: the exported graph gives predict_proba's scores."""
        from .export import export_onnx

        splits = self.data["single"]
        m = self.make().fit(splits["train"], splits["val"], ctx=self.ctx)
        images = [str(it.image) for it in splits["test"].items]
        with m.using(self.ctx):
            res = export_onnx(m, self.root / "model.onnx", check_images=images)
        _check(res.max_diff <= 1e-4, f"onnx: the graph differs from predict_proba by {res.max_diff:.2e}")
        self.ran.append("onnx")

    def stream(self) -> None:
        """Tagged `stream`: a fit on batches read from the feature store equals the in-memory fit."""
        splits = self.data["single"]
        train, val, test = splits["train"], splits["val"], splits["test"]
        ref = self.make().fit(train, val, ctx=self.ctx).predict_proba(test, ctx=self.ctx)
        streamed = RunContext(cache=self.ctx.cache, progress=False, stream=True)
        got = self.make().fit(train, val, ctx=streamed).predict_proba(test, ctx=self.ctx)
        _check(np.allclose(got, ref, atol=1e-6), "stream: a streamed fit differs from the in-memory one")
        self.ran.append("stream")

    def names_only(self) -> None:
        """Tagged `names_only`: a fit from class names alone decodes no image."""
        train = self.data["single"]["train"]
        with _decodes(self.bb) as decoded:
            m = self.make().fit(train, ctx=self.ctx)  # no validation set: nothing to decode
        _check(not decoded, "names_only: fitting from class names decoded images")
        p = m.predict_proba(self.data["single"]["test"], ctx=self.ctx)
        _check(p.shape == (len(self.data["single"]["test"]), len(train.classnames)), "names_only: the model predicts")
        self.ran.append("names_only")


def check_method(
    cls: type[Method], options: dict[str, Any] | None = None, backbone: Backbone | None = None
) -> list[str]:
    """Run the contract checks that `cls`'s declarations and tags call for on tiny toy data;
    `options` shorten its budgets (e.g. {"epochs": 1}). Raises AssertionError naming the first
    failed check; -> the checks that ran."""
    _check(
        bool(cls.name) and cls.name in METHODS and METHODS.get(cls.name) is cls,
        f"{cls.__name__}: register it (@register_method) so load_method finds its saved models",
    )
    _check(bool((cls.__doc__ or "").strip()), f"{cls.name}: a docstring (its first line is the listing's)")
    bb = backbone or create_backbone("toy")
    with tempfile.TemporaryDirectory(prefix="check-method-") as tmp:
        c = _Checker(cls, bb, dict(options or {}), Path(tmp))
        c.kinds(c.make())
        tags = cls.tags
        extra: list[tuple[bool, Callable[[], None]]] = [
            (tags.update, c.update),
            (tags.explain, c.explain),
            (tags.onnx, c.onnx),
            (tags.stream, c.stream),
            (tags.names_only, c.names_only),
        ]
        for tagged, check in extra:
            if tagged:
                check()
        return c.ran
