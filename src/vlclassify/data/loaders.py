"""Loaders: image folders, CSV/JSONL manifests, CoOp split files.

Each returns a dict of splits (`train`, `val`, `test`, or just `all` when the source has no
split); `vlclassify.data.splits` fills in what is missing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..utils import json_fingerprint
from .classes import check_classes
from .decoder import HEIF, HEIF_EXTS, HEIF_REFUSAL, IMAGE_EXTS
from .duplicates import drop_duplicates
from .items import Dataset, Item
from .source import FileSource, file_key

RESERVED = {"image", "label", "labels", "text", "split", "id"}


def image_folder(root: str | os.PathLike, name: str | None = None) -> dict[str, Dataset]:
    """One sub-folder per class; a folder that has `train/` (and `val/`, `test/`) is read per split.

    A class folder's images are read at any depth, in every format Pillow reads (`decode.IMAGE_EXTS`).
    Hidden files and folders (a name starting with `.`: `.DS_Store`, `.thumbnails/`) are not data,
    at any depth, class folders included. Links to files and folders are followed wherever they
    point (each real folder is read once, so a link loop ends); a dangling or looping link is
    skipped. Whatever is skipped (hidden entries, other files, links, HEIC without pillow-heif) is
    counted in one warning naming an example of each kind. Copies of one image (same content) are
    dropped, as for manifests (`data.duplicates`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    name = name or root.name
    skipped = _Skipped(root)
    split_dirs = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if split_dirs:
        classnames = sorted({c for s in split_dirs for c in _class_dirs(root / s, skipped)})
        splits = {s: _read_class_dirs(root / s, classnames, skipped) for s in split_dirs}
    else:
        classnames = _class_dirs(root, skipped)
        splits = {"all": _read_class_dirs(root, classnames, skipped)}
    skipped.warn()
    splits = drop_duplicates(splits, str(root), classnames)
    return {s: Dataset(items=its, classnames=classnames, name=name) for s, its in splits.items()}


class _Skipped:
    """What a folder read skips, by kind, with the first example of each: said once (`warn`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, path: str) -> None:
        self.kinds.setdefault(kind, []).append(os.path.relpath(path, self.root))

    def warn(self) -> None:
        if self.kinds:
            n = sum(len(v) for v in self.kinds.values())
            parts = "; ".join(f"{len(v)} {kind} (e.g. {v[0]})" for kind, v in self.kinds.items())
            warnings.warn(f"{self.root}: {n} file(s) or folder(s) not read: {parts}", stacklevel=3)


def _class_dirs(root: Path, skipped: _Skipped) -> list[str]:
    """The class folder names under `root`, sorted; hidden entries, files and dangling links are skipped."""
    names = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            skipped.add("hidden", str(p))
        elif p.is_dir():
            names.append(p.name)
        elif not p.exists():
            skipped.add("dangling or looping link(s)", str(p))
        else:
            skipped.add("file(s) outside any class folder", str(p))
    return names


def _image_files(folder: Path, skipped: _Skipped) -> list[str]:
    """The image files under `folder` at any depth, sorted (see `image_folder` for what is skipped)."""
    files: list[str] = []
    seen = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if d.startswith("."):
                skipped.add("hidden", full)
            elif real in seen:
                skipped.add("folder link loop(s) or second link(s) to one folder", full)
            else:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            ext = os.path.splitext(f)[1].lower()
            if f.startswith("."):
                skipped.add("hidden", full)
            elif not (ext in IMAGE_EXTS or (ext in HEIF_EXTS and HEIF)):
                kind = f"HEIC/HEIF ({HEIF_REFUSAL})" if ext in HEIF_EXTS else "not image(s)"
                skipped.add(kind, full)
            elif not os.path.exists(full):  # a link to nothing, or to itself
                skipped.add("dangling or looping link(s)", full)
            else:
                files.append(full)
    return sorted(files, key=Path)  # by path parts, as the loader always ordered them


def _read_class_dirs(root: Path, classnames: list[str], skipped: _Skipped) -> list[Item]:
    if len(classnames) < 2:
        raise DataError(f"{root}: need at least 2 class sub-folders, found {len(classnames)}")
    items = []
    for ci, c in enumerate(classnames):
        d = root / c
        files = _image_files(d, skipped) if d.is_dir() else []
        if not files and root.name not in ("val", "test"):
            raise DataError(f"{d}: class {c!r} has no images")
        items += [Item(image=FileSource(p), label=ci, key=file_key(p), origin=p) for p in files]
    return items


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows as dicts with their line number under `__line__`; a BOM is ignored."""
    try:
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path)
        return _read_csv(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for ln, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
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


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty CSV")
        header = [c.strip() for c in reader.fieldnames]
        for c in header:
            if c and header.count(c) > 1:
                raise DataError(f"{path}:1: column {c!r} appears twice in the header")
        reader.fieldnames = header
        rows = []
        for r in reader:
            ln = reader.line_num
            if None in r:
                n = len(header) + len(r[None])
                raise DataError(
                    f"{path}:{ln}: {n} values but the header has {len(header)} column(s) ({', '.join(header)}); "
                    f"add the missing column names to line 1, or quote values that contain a comma"
                )
            if r.get("", None):
                raise DataError(f"{path}:{ln}: a value ({r['']!r}) in a column without a name in the header")
            r.pop("", None)
            rows.append({"__line__": ln, **r})
    return rows


LABEL_SEPARATORS = ",;|"


def split_labels(value: str, sep: str | None = None, known: Container[str] = ()) -> list[str]:
    """One `labels` value -> label names (the rule is in `manifest`'s docstring)."""
    if sep is not None:
        parts = value.split() if sep == "space" else value.split(sep)
    elif any(c in value for c in LABEL_SEPARATORS):
        parts = re.split(f"[{re.escape(LABEL_SEPARATORS)}]", value)
    elif value.strip() in known:
        parts = [value]
    else:
        parts = value.split()
    return [p.strip() for p in parts if p.strip()]


def manifest(
    path: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
    allow_missing_image: bool = False,
    allow_empty_labels: bool = False,
    labels_sep: str | None = None,
) -> dict[str, Dataset]:
    """CSV or JSONL with `image`, `label` or `labels`, optional `text`, `split` and task columns.

    A `labels` column makes the data multi-label. In JSONL it is a list of names. In CSV (or a
    JSONL string) the value is split into names by this rule:

    - a value containing `,` `;` or `|` is split on those, and spaces inside a name are kept:
      `"animal, mammal"` -> animal, mammal; `"ankle boot;sandal"` -> ankle boot, sandal;
    - any other value is split on whitespace (`"scab rust"` -> scab, rust), unless the whole value
      is a class name seen in another row's separated list or given in `classes` (`"ankle boot"`
      alone stays one label when `ankle boot` appears elsewhere, or write it `"ankle boot;"`);
    - `labels_sep=` forces one separator for every value (`labels_sep=;`, or `space` for
      whitespace); a trailing or doubled separator never makes an empty label.

    A row without a label is an error unless `allow_empty_labels` (it is then kept unlabelled;
    an empty task value likewise). Task columns: the names in `tasks`, or, when there is no
    `label`/`labels` column, every other column. `classes` fixes the class list (a label outside
    it is an error); by default it is the sorted set of labels seen. Image paths are relative to
    `root` (default: the manifest's folder). Copies of one image are dropped (`data.duplicates`).
    Each item's `origin` is its row, `path:line`.
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
        found = ", ".join(sorted(cols))
        hint = next((f"; the file seems to use {d!r} between values, not ','" for d in ";\t" if d in found), "")
        raise DataError(f"{path}: needs an 'image' column (found: {found}){hint}")
    if "label" in cols and "labels" in cols:
        raise DataError(f"{path}: has both a 'label' and a 'labels' column; keep one ('labels' for several per row)")
    multilabel = "labels" in cols
    main = "labels" if multilabel else ("label" if "label" in cols else None)
    if labels_sep is not None and (not multilabel or not labels_sep):
        raise DataError(
            f"{path}: labels_sep={labels_sep!r} " + ("is empty" if not labels_sep else "needs a 'labels' column")
        )
    task_cols = list(tasks) if tasks else ([] if main else sorted(cols - RESERVED))
    for t in task_cols:
        if t not in cols:
            raise DataError(f"{path}: task column {t!r} not found (columns: {', '.join(sorted(cols))})")
    if main is None and not task_cols:
        raise DataError(f"{path}: needs a 'label' or 'labels' column, or task columns")
    if classes is not None:
        classes = check_classes(classes, f"{path}: classes=")

    def where(r: dict) -> str:
        return f"{path}:{r['__line__']}"

    def cell(r: dict, col: str) -> str:
        v = r.get(col)
        if isinstance(v, (list, dict)):
            hint = " (use a 'labels' column for several labels)" if col == "label" else ""
            raise DataError(f"{where(r)}: {col!r} must be a single value, got {v!r}{hint}")
        return "" if v is None else str(v).strip()

    def label_names(r: dict, known: Container[str] = ()) -> list[str]:
        assert main is not None, "called for data with a label column"
        if not multilabel:
            v = cell(r, main)
            return [v] if v else []
        raw = r.get(main)
        if isinstance(raw, list):
            if any(isinstance(x, (list, dict)) for x in raw):
                raise DataError(f"{where(r)}: 'labels' must be a list of names, got {raw!r}")
            return [str(x).strip() for x in raw if x is not None and str(x).strip()]
        return split_labels(cell(r, main), labels_sep, known)

    if main:
        known = set(classes or ())
        if multilabel and labels_sep is None:
            separated = [
                r for r in rows if isinstance(r.get(main), str) and any(c in r[main] for c in LABEL_SEPARATORS)
            ]
            known |= {n for r in separated for n in label_names(r)}
        names_of = {id(r): label_names(r, known) for r in rows}
        classnames = classes if classes else sorted({n for ns in names_of.values() for n in ns})
    else:
        classnames = []
    cindex = {c: i for i, c in enumerate(classnames)}
    task_classes = {t: sorted({cell(r, t) for r in rows} - {""}) for t in task_cols}
    if not main and task_cols:
        classnames = task_classes[task_cols[0]]

    splits: dict[str, list[Item]] = {}
    for r in rows:
        img = r.get("image")
        if img is not None and not isinstance(img, str):
            raise DataError(f"{where(r)}: 'image' must be a file path, got {img!r}")
        img = (img or "").strip()
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
            names = names_of[id(r)]
            for n in names:
                if n not in cindex:
                    raise DataError(f"{where(r)}: label {n!r} is not in the class list ({', '.join(classnames)})")
            if not names and not allow_empty_labels:
                raise DataError(
                    f"{where(r)}: empty {main!r} value (pass allow_empty_labels=true to keep unlabelled rows)"
                )
            if multilabel:
                labels = tuple(sorted({cindex[n] for n in names}))
            elif names:
                label = cindex[names[0]]
        task_vals = {}
        for t in task_cols:
            v = cell(r, t)
            if v:
                task_vals[t] = task_classes[t].index(v)
            elif not allow_empty_labels:
                raise DataError(
                    f"{where(r)}: empty value in task column {t!r} (pass allow_empty_labels=true to keep it unlabelled)"
                )
        if not main and task_cols:
            label = task_vals.get(task_cols[0])
        key = file_key(img_path) if img_path else f"text:{r['__line__']}"
        item = Item(
            image=str(img_path) if img_path else None,
            label=label,
            labels=labels,
            text=text or None,
            tasks=task_vals or None,
            key=f"{key}|{r['__line__']}",
            origin=where(r),
        )
        split = cell(r, "split").lower() or "all"
        if split not in ("train", "val", "test", "all"):
            raise DataError(f"{where(r)}: split must be train, val or test, got {split!r}")
        splits.setdefault(split, []).append(item)
    if "all" in splits and len(splits) > 1:
        raise DataError(f"{splits['all'][0].origin}: empty 'split' value, while other rows have one")
    splits = drop_duplicates(splits, str(path), classnames, task_classes)
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
            items=[
                Item(image=str(base / r[0]), label=r[1], key=f"{r[0]}", origin=f"{path}:{split}[{i}]")
                for i, r in enumerate(rows)
            ],
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
