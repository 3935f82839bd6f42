"""`split.json`: the items a fit trained and validated on, in CoOp's split-file layout.

Every `vlclassify fit` writes one into its output folder, so anyone can audit the exact items or
reuse them (`fit --split-file`, `read_split_file`). Layout:

    {
      "data": "<spec>",                                 the data spec of the fit
      "train": [[path, label, classname], ...],         in the order the fit used them
      "val":   [[path, label, classname], ...],
      "test":  {"source": "<spec>#test"}                the data's own test split, or
               {"source": "<spec>#all", "minus": ["train", "val"]}   every item not in train or val, or
               null                                     no test split
    }

`path` is the image path relative to the data root (the image folder; the manifest's or CoOp
split file's folder, or its `root=` option) when the image lies under it, else the absolute path.
Items without an image file use their key: `fashion-mnist/train/123` (built-in arrays),
`feats.safetensors#17` (row 17 of a feature file). `classname` is vlclassify's class name (for
CoOp data: CoOp's with underscores as spaces, as CoOp's prompts use it; either spelling reads
back). Multi-label rows are `[path, [label, ...], [classname, ...]]`. For a CoOp split file,
`path` and `label` are CoOp's own, so the few-shot lists compare one to one with CoOp's choice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..utils import atomic_path
from .items import Dataset, Item
from .source import FileSource
from .spec import BUILTIN, parse_spec

TEST_RULES = ("test", "all")  # where the test items come from: the test split, or `all` minus train and val


class Splits(dict):
    """The train / val / test Datasets of a fit, and where its test items come from
    (`test_from`: "test", "all" = the items of `all` not in train or val, or None)."""

    def __init__(self, splits: Mapping[str, Dataset], test_from: str | None) -> None:
        super().__init__(splits)
        self.test_from = test_from


def data_root(spec: str | None) -> Path | None:
    """The folder split-file paths are relative to, for a data spec (None: keep absolute paths)."""
    if not spec:
        return None
    base, opts = parse_spec(spec)
    if opts.get("root"):
        return Path(opts["root"])
    if base in BUILTIN:
        return None
    p = Path(base)
    return p if p.is_dir() else p.parent


def item_path(item: Item, root: Path | None) -> str:
    """The `path` of an item in a split file (see the module docstring)."""
    if not isinstance(item.image, FileSource):
        return item.key
    img = os.path.abspath(item.image.path)
    if root is not None:
        rel = os.path.relpath(img, os.path.abspath(root))
        if not rel.startswith(".."):
            return Path(rel).as_posix()
    return Path(img).as_posix()


def _row(ds: Dataset, item: Item, root: Path | None) -> list:
    if ds.multilabel:
        labels = list(item.labels or ())
        return [item_path(item, root), labels, [ds.classnames[l] for l in labels]]
    return [item_path(item, root), item.label, None if item.label is None else ds.classnames[item.label]]


def write_split_file(path: str | os.PathLike, splits: Mapping[str, Dataset], spec: str) -> Path:
    """Write `split.json` for the `train` / `val` (/ `test`) Datasets of a fit on `spec`.

    `splits` from `plan_splits` knows where its test items came from; a plain dict with a
    `test` entry is taken to use the data's test split."""
    path = Path(path)
    root = data_root(spec)
    test_from = getattr(splits, "test_from", "test" if "test" in splits else None)
    test: dict[str, Any] | None = None
    if test_from == "test":
        test = {"source": f"{spec}#test"}
    elif test_from == "all":
        test = {"source": f"{spec}#all", "minus": ["train", "val"]}
    parts = [f'  "data": {json.dumps(spec)}']
    for name in ("train", "val"):
        ds = splits.get(name)
        rows = [json.dumps(_row(ds, it, root)) for it in ds.items] if ds is not None else []
        body = "[\n" + ",\n".join(f"    {r}" for r in rows) + "\n  ]" if rows else "[]"
        parts.append(f'  "{name}": {body}')
    parts.append(f'  "test": {json.dumps(test)}')
    with atomic_path(path) as tmp:
        tmp.write_text("{\n" + ",\n".join(parts) + "\n}\n")
    return path


def _candidates(what: str) -> tuple[str, ...]:
    return ("train", "all") if what == "train" else ("val", "train", "all")


def _match(path: Path, what: str, rows: list, raw: Mapping[str, Dataset], root: Path | None) -> tuple[str, list[int]]:
    """(name of the raw split holding every row, indices of the rows' items in it)."""
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)):
            raise DataError(f"{path}: {what}[{i}] must be [path, label, classname], got {row!r}")
    names = [n for n in _candidates(what) if n in raw]
    if not names:
        raise DataError(f"{path}: the data has no {' or '.join(_candidates(what))} split to take {what!r} from")
    first_missing: tuple[str, int] | None = None  # (split, row) of the first row a candidate split lacks
    for name in names:
        ds = raw[name]
        where: dict[str, list[int]] = {}
        for j, it in enumerate(ds.items):
            where.setdefault(item_path(it, root), []).append(j)
        missing = next((i for i, r in enumerate(rows) if r[0] not in where), None)
        if missing is not None:
            first_missing = first_missing if first_missing is not None else (name, missing)
            continue
        used: set[int] = set()
        out = []
        for i, (p, label, classname) in enumerate(rows):
            want = _row(ds, ds.items[where[p][0]], root)
            same = [j for j in where[p] if _row(ds, ds.items[j], root)[1] == label]
            if not same:
                raise DataError(
                    f"{path}: {what}[{i}] {p!r} has label {label!r} ({classname!r}); "
                    f"the data labels it {want[1]!r} ({want[2]!r})"
                )
            got = _row(ds, ds.items[same[0]], root)[2]
            if json.dumps(got).replace("_", " ") != json.dumps(classname).replace("_", " "):  # CoOp's raw names too
                raise DataError(f"{path}: {what}[{i}] {p!r}: class {classname!r}, but label {label!r} is {got!r} here")
            j = next((j for j in same if j not in used), same[0])  # duplicates: the next unused copy
            used.add(j)
            out.append(j)
        return name, out
    assert first_missing is not None  # every candidate split lacked a row, or it returned
    name, i = first_missing
    raise DataError(
        f"{path}: {what}[{i}] {rows[i][0]!r} is not an item of the data's {name!r} split"
        + (f" (paths are relative to {root})" if root is not None else "")
    )


def read_split_file(path: str | os.PathLike, raw_splits: Mapping[str, Dataset], spec: str | None = None) -> Splits:
    """The train / val / test Datasets a split file names, taken from `raw_splits` (what
    `load_data` returned for the data): exactly the listed items, in the listed order.

    `spec` (default: the file's "data") gives the data root that relative paths start from."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        raise DataError(f"{path}: expected an object with a 'train' list (a split.json written by vlclassify fit)")
    root = data_root(spec or data.get("data"))
    out: dict[str, Dataset] = {}
    taken: dict[str, set[int]] = {}
    for what in ("train", "val"):
        rows = data.get(what) or []
        if what == "val" and not rows:
            continue
        if not isinstance(rows, list):
            raise DataError(f"{path}: {what!r} must be a list of [path, label, classname]")
        name, idx = _match(path, what, rows, raw_splits, root)
        out[what] = raw_splits[name].subset(idx)
        taken.setdefault(name, set()).update(idx)
    test = data.get("test")
    if test is None:
        return Splits(out, None)
    source = test.get("source", "") if isinstance(test, dict) else ""
    rule = source.rpartition("#")[2]
    if rule not in TEST_RULES:
        raise DataError(f"{path}: 'test' must be {{'source': '<spec>#test'}} or '<spec>#all', got {test!r}")
    if rule not in raw_splits:
        raise DataError(f"{path}: the test items come from the data's {rule!r} split, which it does not have")
    if rule == "test":
        out["test"] = raw_splits["test"]
    else:
        pool, used = raw_splits["all"], taken.get("all", set())
        out["test"] = pool.subset([i for i in range(len(pool)) if i not in used])
    return Splits(out, rule)
