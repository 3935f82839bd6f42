"""Loaders: image folders, CSV/JSONL manifests, CoOp split files.

Each returns a dict of splits (`train`, `val`, `test`, or just `all` when the source has no
split); `vlclassify.data.splits` fills in what is missing.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..utils import json_fingerprint
from .items import Dataset, Item

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RESERVED = {"image", "label", "labels", "text", "split", "id"}


def file_key(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return f"{os.fspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def image_folder(root: str | os.PathLike, name: str | None = None) -> dict[str, Dataset]:
    """One sub-folder per class; a folder that has `train/` (and `val/`, `test/`) is read per split."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    split_dirs = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if split_dirs:
        classnames = sorted({p.name for s in split_dirs for p in (root / s).iterdir() if p.is_dir()})
        return {s: _read_class_dirs(root / s, classnames, name or root.name) for s in split_dirs}
    classnames = sorted(p.name for p in root.iterdir() if p.is_dir())
    return {"all": _read_class_dirs(root, classnames, name or root.name)}


def _read_class_dirs(root: Path, classnames: list[str], name: str) -> Dataset:
    if len(classnames) < 2:
        raise DataError(f"{root}: need at least 2 class sub-folders, found {len(classnames)}")
    items = []
    for ci, c in enumerate(classnames):
        d = root / c
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS) if d.is_dir() else []
        if not files and root.name not in ("val", "test"):
            raise DataError(f"{d}: class {c!r} has no images")
        items += [Item(image=str(p), label=ci, key=file_key(p)) for p in files]
    return Dataset(items=items, classnames=classnames, name=name)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".jsonl":
        rows = []
        for ln, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{ln}: each line must be a JSON object")
            rows.append({"__line__": ln, **row})
        return rows
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty CSV")
        return [{"__line__": i + 2, **r} for i, r in enumerate(reader)]


def _split_labels(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v for v in str(value or "").split() if v]


def manifest(
    path: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
    allow_missing_image: bool = False,
    allow_empty_labels: bool = False,
) -> dict[str, Dataset]:
    """CSV or JSONL with `image`, `label` or `labels`, optional `text`, `split` and task columns.

    `labels` (space-separated in CSV, a list in JSONL) makes the data multi-label. Task columns:
    the names in `tasks`, or, when there is no `label`/`labels` column, every other column.
    `classes` fixes the class list (a label outside it is an error); by default it is the sorted
    set of labels seen. Image paths are relative to `root` (default: the manifest's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    base = Path(root) if root else path.parent
    cols = set().union(*(r.keys() for r in rows)) - {"__line__"}
    if "image" not in cols and "text" not in cols:
        raise DataError(f"{path}: needs an 'image' column (found: {', '.join(sorted(cols))})")
    multilabel = "labels" in cols
    main = "labels" if multilabel else ("label" if "label" in cols else None)
    task_cols = list(tasks) if tasks else ([] if main else sorted(cols - RESERVED))
    for t in task_cols:
        if t not in cols:
            raise DataError(f"{path}: task column {t!r} not found (columns: {', '.join(sorted(cols))})")
    if main is None and not task_cols:
        raise DataError(f"{path}: needs a 'label' or 'labels' column, or task columns")

    def where(r: dict) -> str:
        return f"{path}:{r['__line__']}"

    if main:
        seen = (
            sorted({l for r in rows for l in _split_labels(r.get(main))})
            if multilabel
            else sorted({str(r.get(main, "")).strip() for r in rows if str(r.get(main, "")).strip()})
        )
        classnames = list(classes) if classes else seen
    else:
        classnames = []
    cindex = {c: i for i, c in enumerate(classnames)}
    task_classes = {
        t: sorted({str(r.get(t, "")).strip() for r in rows if str(r.get(t, "")).strip()}) for t in task_cols
    }
    if not main and task_cols:
        classnames = task_classes[task_cols[0]]
        cindex = {c: i for i, c in enumerate(classnames)}

    splits: dict[str, list[Item]] = {}
    for r in rows:
        img = str(r.get("image") or "").strip()
        text = r.get("text")
        text = str(text).strip() if text is not None else None
        img_path = None
        if img:
            p = Path(img)
            img_path = p if p.is_absolute() else base / p
            if not img_path.is_file():
                raise DataError(f"{where(r)}: image file not found: {img_path}")
        elif not allow_missing_image:
            raise DataError(f"{where(r)}: empty 'image' value")
        elif not text:
            raise DataError(f"{where(r)}: row has neither an image nor a text")
        label = labels = None
        if main:
            names = _split_labels(r.get(main)) if multilabel else [str(r.get(main, "")).strip()]
            names = [n for n in names if n]
            for n in names:
                if n not in cindex:
                    raise DataError(f"{where(r)}: label {n!r} is not in the class list ({', '.join(classnames)})")
            if not names and not allow_empty_labels:
                raise DataError(f"{where(r)}: empty {main!r}")
            if multilabel:
                labels = tuple(sorted({cindex[n] for n in names}))
            elif names:
                label = cindex[names[0]]
        task_vals = {}
        for t in task_cols:
            v = str(r.get(t, "")).strip()
            if not v:
                raise DataError(f"{where(r)}: empty value in task column {t!r}")
            task_vals[t] = task_classes[t].index(v)
        if not main and task_cols:
            label = task_vals[task_cols[0]]
        key = file_key(img_path) if img_path else f"text:{r['__line__']}"
        item = Item(
            image=str(img_path) if img_path else None,
            label=label,
            labels=labels,
            text=text or None,
            tasks=task_vals or None,
            key=f"{key}|{r['__line__']}",
        )
        split = str(r.get("split") or "all").strip().lower()
        if split not in ("train", "val", "test", "all"):
            raise DataError(f"{where(r)}: split must be train, val or test, got {split!r}")
        splits.setdefault(split, []).append(item)
    if "all" in splits and len(splits) > 1:
        raise DataError(f"{path}: some rows have a 'split' value and some do not")
    if main and not classes:
        counts = {c: 0 for c in classnames}
        for its in splits.values():
            for it in its:
                for l in it.labels if it.labels is not None else ((it.label,) if it.label is not None else ()):
                    counts[classnames[l]] += 1
        rare = [c for c, n in counts.items() if n == 1]
        if rare and len(rows) >= 4 * len(classnames):
            warnings.warn(
                f"{path}: label(s) {', '.join(map(repr, rare))} appear in one row only (a typo?); "
                f"pass classes=... to check labels against a fixed list",
                stacklevel=2,
            )
    src = json_fingerprint([str(path), os.stat(path).st_mtime_ns])
    return {
        s: Dataset(
            items=its, classnames=classnames, name=path.stem, multilabel=multilabel, tasks=task_classes, source=src
        )
        for s, its in splits.items()
    }


def coop_split(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Dataset]:
    """CoOp's split JSON: `{"train"|"val"|"test": [[relative_path, label, classname], ...]}`.

    Paths are relative to `root` (default: the JSON's folder). Images are checked lazily at
    extraction time: the standard datasets have up to 50k files.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not any(k in data for k in ("train", "val", "test")):
        raise DataError(f"{path}: expected an object with 'train', 'val' and 'test' lists")
    base = Path(root) if root else path.parent
    names: dict[int, str] = {}
    for split, rows in data.items():
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[1], int)):
                raise DataError(f"{path}: {split}[{i}] must be [relative_path, label, classname], got {row!r}")
            prev = names.setdefault(row[1], row[2])
            if prev != row[2]:
                raise DataError(f"{path}: {split}[{i}]: label {row[1]} is named {row[2]!r} here and {prev!r} elsewhere")
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{path}: labels must be 0..C-1, found {sorted(names)[:5]}...")
    classnames = [names[i].replace("_", " ") for i in range(len(names))]
    src = json_fingerprint([str(path.resolve()), os.stat(path).st_mtime_ns, str(base.resolve())])
    return {
        split: Dataset(
            items=[Item(image=str(base / r[0]), label=r[1], key=f"{r[0]}") for r in rows],
            classnames=classnames,
            name=path.stem,
            source=src,
        )
        for split, rows in data.items()
        if split in ("train", "val", "test")
    }


def check_labels(ds: Dataset) -> None:
    """Single-label data: every label is a valid class index."""
    for i, it in enumerate(ds.items):
        for l in (it.labels or ()) + ((it.label,) if it.label is not None else ()):
            if not 0 <= l < ds.num_classes:
                raise DataError(f"{ds.name}: item {i} ({it.key}) has label {l} outside 0..{ds.num_classes - 1}")


def iter_nonempty(xs: Iterable[str]) -> list[str]:
    return [x for x in xs if x]
