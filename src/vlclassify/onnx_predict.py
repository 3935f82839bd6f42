"""Predict without torch: a fitted model's ONNX export (export.py) run in ONNX Runtime.

A cold `vlclassify predict` spent more time importing torch (2.2-2.5 s here) than predicting. An
exported model answers from its graph instead: pixels from the numpy recipe the export recorded
(pixels.py, the same function the backbone's `preprocess` calls), the graph in ONNX Runtime, and the
model's own decision rule (methods/decision.py) on the probabilities. Nothing here imports torch,
at module level or later; a test runs a cold predict in a subprocess and checks `sys.modules`.

The export lives beside the model (`model.onnx` + `model.onnx.json`; `model-int8.onnx` for
`precision="int8"`). `export_problem_here` says why an export cannot be used as it is: missing,
from another export version, made from another config.json or other backbone weights (stale),
bytes that no longer match its recorded SHA-256 (damaged), or a backbone whose preprocessing is not
a numpy recipe. Then `export.export_beside` (torch) makes it again, once.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data.decoder import decode
from .data.items import Item
from .errors import ConfigError, DataError
from .methods.decision import MAIN, DecisionRule, Prediction, task_prediction
from .pixels import recipe_pixels
from .utils import cached_file_fingerprint, read_json, sha256_file

EXPORT_VERSION = 2  # export.py's EXPORT_VERSION, which that module cannot share without torch
PRECISIONS = ("fp32", "int8")
_GRAPHS = {"fp32": "model.onnx", "int8": "model-int8.onnx"}
ImageInput = str | os.PathLike | Item | Image.Image  # a file, an Item (decoded by the one decoder) or a decoded image


def graph_path(model_dir: str | os.PathLike, precision: str = "fp32") -> Path:
    """Where the export of `precision` lives beside the model."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} for an exported model, got {precision!r}")
    return Path(model_dir) / _GRAPHS[precision]


def sidecar_path(graph: Path) -> Path:
    """The JSON description beside a graph."""
    return graph.with_name(graph.name + ".json")


def export_problem_here(model_dir: str | os.PathLike, precision: str = "fp32") -> str | None:
    """Why the export beside `model_dir` cannot answer for the model as it is now (one line), or None."""
    graph = graph_path(model_dir, precision)
    side_path = sidecar_path(graph)
    if not graph.is_file() or not side_path.is_file():
        return f"{graph}: no export yet"
    try:
        side = read_json(side_path)
    except ConfigError as e:
        return str(e)
    if not isinstance(side, dict) or side.get("version") != EXPORT_VERSION:
        return f"{side_path}: made by another export version"
    source = side.get("source") or {}
    config = Path(model_dir) / "config.json"
    if not config.is_file() or source.get("config_sha256") != sha256_file(config):
        return f"{side_path}: stale (made from another {config})"
    for f, fp in (source.get("backbone_files") or {}).items():
        if not Path(f).is_file() or cached_file_fingerprint(f) != fp:
            return f"{side_path}: stale (the backbone's weights {f} changed)"
    if side.get("graph_sha256") != sha256_file(graph):
        return f"{graph}: damaged (its SHA-256 does not match {side_path.name})"
    if side.get("pixels") is None:
        return f"{side_path}: the backbone's preprocessing is not a numpy recipe; predicting with torch"
    return None


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # the exporter's loops make ORT warn about subgraph names; only errors matter
    so.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the cores are shared
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxModel:
    """A model folder's export, ready to answer: `predict_proba` and `predict_results` as the
    Method's, from image files or decoded RGB images. Check `export_problem_here` first."""

    def __init__(self, model_dir: str | os.PathLike, precision: str = "fp32", threads: int | None = None) -> None:
        self.graph = graph_path(model_dir, precision)
        side: dict[str, Any] = read_json(sidecar_path(self.graph))
        self.precision = precision
        self.method: str = side["method"]
        self.classnames: list[str] = list(side["classes"])
        self.pixels: dict[str, Any] = side["pixels"]
        rule = {k: v for k, v in side["decision"].items() if k != "rule"}
        self.rule = DecisionRule.from_dict(rule, len(self.classnames), f"{sidecar_path(self.graph)}: decision")
        # the "unknown" rule (trust/openset.py): the graph's open-set score below the threshold
        out = side["outputs"].get("open_set")
        applies = out is not None and side.get("unknown", {}).get("applies", False)
        self.open_set: tuple[str, float] | None = (out["score"], float(out["unknown_below"])) if applies else None
        self.session = _session(self.graph, threads)

    def predict_proba(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """[N, C] scores of image files, Items or RGB PIL images, in batches."""
        return self._run(images, batch_size)[0]

    def _run(
        self, images: Sequence[ImageInput], batch_size: int = 32, skip_bad: bool = False
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """([N', C] scores, [N'] open-set scores, or [N'] zeros when the graph has none, the indices
        of the N' images answered). With `skip_bad` an unreadable image is left out, as
        `Method.encode` leaves it out (one warning naming the count and the first); else its error."""
        probs, open_set = [np.zeros((0, len(self.classnames)), np.float32)], [np.zeros(0, np.float32)]
        kept: list[int] = []
        bad: list[int] = []
        for s in range(0, len(images), batch_size):
            pixels, idx = [], []
            for i in range(s, min(s + batch_size, len(images))):
                try:
                    rgb = _rgb(images[i], self.pixels["size"])
                except DataError:
                    if not skip_bad:
                        raise
                    bad.append(i)
                    continue
                pixels.append(recipe_pixels(rgb, self.pixels))
                idx.append(i)
            if not idx:
                continue
            out = self.session.run(None, {"pixels": np.stack(pixels)})  # probs [n, C] (, open_set [n])
            probs.append(out[0])
            open_set.append(out[1] if len(out) > 1 else np.zeros(len(idx), np.float32))
            kept.extend(idx)
        if bad:
            warnings.warn(
                f"predict: skipped {len(bad)} unreadable image(s) (first: {_origin(images[bad[0]])})", stacklevel=3
            )
        return np.concatenate(probs), np.concatenate(open_set), kept

    def predict_results(self, images: Sequence[ImageInput], top: int = 5, skip_bad: bool = False) -> list[Prediction]:
        """One Prediction per image (the decision and the top scores), as `Method.predict_results`;
        with `skip_bad`, unreadable images are left out (fewer predictions than images, one warning)."""
        probs, open_set, kept = self._run(images, skip_bad=skip_bad)
        decided = self.rule.apply(probs)
        results = []
        for i, p, d, o in zip(kept, probs, decided, open_set):
            task = task_prediction(p, d, self.classnames, top)
            unknown, scored = False, None
            if self.open_set is not None:
                score, threshold = self.open_set
                unknown, scored = bool(o < threshold), {"score": score, "value": float(o), "threshold": threshold}
                if unknown:  # none of the classes: no label, and not "uncertain" between them either
                    task = dataclasses.replace(task, labels=[], uncertain=False)
            results.append(Prediction({MAIN: task}, None, _name(images[i]), unknown, scored))
        return results


def _rgb(image: ImageInput, size: int) -> Image.Image:
    """A file path or Item -> RGB by the one decoder (EXIF, reduced towards the model's `size`, as
    extraction decodes); a PIL image is taken as decoded."""
    if isinstance(image, Image.Image):
        return image
    return decode(image if isinstance(image, Item) else str(image), size=size)


def _origin(image: ImageInput) -> str:
    """How a skipped image is named in the warning, as `Method.encode` names it (the manifest row, else the key)."""
    if isinstance(image, Item):
        return str(image.origin or image.key)
    return str(image) if isinstance(image, (str, os.PathLike)) else "image"


def _name(image: ImageInput) -> str:
    """What a Prediction calls the image, as `Method.predict_results` does (the path, else the key)."""
    if isinstance(image, Item):
        return str(image.image.describe() if image.image is not None else image.key)
    return str(image) if isinstance(image, (str, os.PathLike)) else "image"
