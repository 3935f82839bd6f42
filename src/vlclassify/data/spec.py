"""`--data SPEC` strings: a built-in name, a folder, a manifest or a CoOp split file.

    fashion-mnist            Debian dataset-fashion-mnist (train/test)
    tuxpaint                 Debian tuxpaint-stamps-default photos (15 categories)
    fmnist-mosaic            multi-label: 2x2 mosaics of 2-4 Fashion-MNIST items (data/composites.py)
    tuxpaint-composite       multi-label: 1-3 Tux Paint cut-outs pasted on a canvas (data/composites.py)
    PATH/                    image folder (one sub-folder per class; optional train/val/test)
    PATH.csv | PATH.jsonl    manifest
    PATH.json                CoOp split file
    PATH-{000..009}.tar      WebDataset tar shards (data/webdataset.py)
Options follow after `?`, e.g. `tuxpaint?root=/my/stamps` or `data.csv?tasks=color,style`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError
from . import builtin, composites, loaders, webdataset
from .items import Dataset
from .splits import stratified_split

BUILTIN = {"fashion-mnist": builtin.fashion_mnist, "tuxpaint": builtin.tuxpaint}
BUILTIN.update({"fmnist-mosaic": composites.fmnist_mosaic, "tuxpaint-composite": composites.tuxpaint_composite})


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    base, _, query = spec.partition("?")
    opts: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        k, eq, v = part.partition("=")
        if not eq:
            raise DataError(f"data spec {spec!r}: option {part!r} must be key=value")
        opts[k] = v.split(",") if k in ("tasks", "classes") else v
    for flag in ("allow_missing_image", "allow_empty_labels"):
        if flag in opts:
            opts[flag] = str(opts[flag]).lower() in ("1", "true", "yes")
    return base, opts


def load_data(spec: str) -> dict[str, Dataset]:
    """Load every split the source has (`train`/`val`/`test`, or `all`)."""
    base, opts = parse_spec(spec)
    if base in BUILTIN:
        return BUILTIN[base](**opts)
    if webdataset.is_webdataset(base):
        return webdataset.load_webdataset(base, **opts)
    p = Path(base)
    if not p.exists():
        raise DataError(f"data {base!r}: no such file or folder, and not one of: {', '.join(BUILTIN)}")
    if p.is_dir():
        return loaders.image_folder(p, **opts)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".jsonl"):
        return loaders.manifest(p, **opts)
    if suffix == ".json":
        return loaders.coop_split(p, **opts)
    raise DataError(f"data {base!r}: expected a folder, .csv, .jsonl or CoOp .json")


def train_val_test(
    splits: dict[str, Dataset], seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> dict[str, Dataset]:
    """Fill in missing splits: `all` -> stratified train/val/test; no `val` -> carved from train."""
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
