"""`--data SPEC` strings: a built-in name, a folder, a manifest or a CoOp split file.

    fashion-mnist            Debian dataset-fashion-mnist (train/test)
    tuxpaint                 Debian tuxpaint-stamps-default photos (15 categories)
    fmnist-mosaic            multi-label: 2x2 mosaics of 2-4 Fashion-MNIST items (data/composites.py)
    tuxpaint-composite       multi-label: 1-3 Tux Paint cut-outs pasted on a canvas (data/composites.py)
    PATH/                    image folder (one sub-folder per class; optional train/val/test)
    PATH.csv | PATH.jsonl    manifest
    PATH.json                CoOp split file
    PATH.safetensors | .npz  precomputed features: embeddings, labels, class names (data/precomputed.py)
    PATH-{000..009}.tar      WebDataset tar shards (data/webdataset.py)
Options follow after `?`, e.g. `tuxpaint?root=/my/stamps`, `data.csv?tasks=color,style`,
`data.csv?labels_sep=;` or `data.csv?classes=classes.txt`; an unknown option is an error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DataError
from . import builtin, composites, loaders, precomputed, webdataset
from .classes import parse_classes
from .items import Dataset
from .splits import stratified_split

BUILTIN: dict[str, Callable[..., dict[str, Dataset]]] = {
    "fashion-mnist": builtin.fashion_mnist,
    "tuxpaint": builtin.tuxpaint,
}
BUILTIN.update({"fmnist-mosaic": composites.fmnist_mosaic, "tuxpaint-composite": composites.tuxpaint_composite})


LIST_OPTIONS = ("tasks",)  # comma-separated lists
FLAG_OPTIONS = ("allow_missing_image", "allow_empty_labels")
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`base?key=value&...` -> (base, options). `classes=` is a comma-separated list or a class file
    (`data.classes.parse_classes`); flags take true/false; a malformed option is a one-line error."""
    base, _, query = spec.partition("?")
    opts: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        k, eq, v = part.partition("=")
        k = k.strip()
        if not eq or not k:
            raise DataError(f"data spec {spec!r}: option {part!r} must be key=value")
        if k in opts:
            raise DataError(f"data spec {spec!r}: option {k!r} is given twice")
        value: str | list[str] | bool = v
        if k in LIST_OPTIONS:
            value = [x.strip() for x in v.split(",")]
            if not all(value):
                raise DataError(f"data spec {spec!r}: option {part!r} has an empty name in its list")
        elif k == "classes":
            value = parse_classes(v)[0]
        elif k in FLAG_OPTIONS:
            if v.strip().lower() not in TRUE + FALSE:
                raise DataError(f"data spec {spec!r}: option {k}={v!r} must be true or false")
            value = v.strip().lower() in TRUE
        opts[k] = value
    return base, opts


def _call(fn: Callable[..., dict[str, Dataset]], spec: str, opts: dict[str, Any], *args: Any) -> dict[str, Dataset]:
    """fn(*args, **opts), an unknown option being a one-line error that lists the known ones."""
    params = list(inspect.signature(fn).parameters)[len(args) :]
    unknown = [k for k in opts if k not in params]
    if unknown:
        raise DataError(f"data spec {spec!r}: unknown option {unknown[0]!r} (options: {', '.join(params) or 'none'})")
    return fn(*args, **opts)


def load_data(spec: str) -> dict[str, Dataset]:
    """Load every split the source has (`train`/`val`/`test`, or `all`)."""
    base, opts = parse_spec(spec)
    if base in BUILTIN:
        return _call(BUILTIN[base], spec, opts)
    if webdataset.is_webdataset(base):
        return _call(webdataset.load_webdataset, spec, opts, base)
    p = Path(base)
    if not p.exists():
        raise DataError(f"data {base!r}: no such file or folder, and not one of: {', '.join(BUILTIN)}")
    if p.is_dir():
        return _call(loaders.image_folder, spec, opts, p)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".jsonl"):
        return _call(loaders.manifest, spec, opts, p)
    if suffix == ".json":
        return _call(loaders.coop_split, spec, opts, p)
    if suffix in precomputed.SUFFIXES:
        return _call(precomputed.load_precomputed, spec, opts, p)
    raise DataError(f"data {base!r}: expected a folder, .csv, .jsonl, CoOp .json, or .safetensors / .npz features")


def _fraction(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{name}={value!r}: expected a number between 0 and 1") from None
    if not 0 <= v < 1:
        raise DataError(f"{name}={v}: must be at least 0 and below 1")
    return v


def train_val_test(
    splits: dict[str, Dataset], seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> dict[str, Dataset]:
    """Fill in missing splits: `all` -> stratified train/val/test; no `val` -> carved from train."""
    val_fraction, test_fraction = _fraction("val_fraction", val_fraction), _fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction {val_fraction} + test_fraction {test_fraction} leave no training data")
    splits = dict(splits)
    if "all" in splits:
        splits = stratified_split(
            splits.pop("all"),
            {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction},
            seed,
        )
    if "train" not in splits:
        raise DataError("data has no 'train' split")
    if "val" not in splits:
        parts = stratified_split(splits["train"], {"train": 1 - val_fraction, "val": val_fraction}, seed)
        splits["train"], splits["val"] = parts["train"], parts["val"]
    return splits
