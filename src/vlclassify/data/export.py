"""Write any data spec out as a plain folder: the images and one CSV manifest.

    vlclassify data export tuxpaint-composite demo/leaves     # images/ + labels.csv (multi-label)

The CSV has the columns a user's own manifest would have (`image`, `label` or `labels`, `text`,
`split`; for data with several tasks one column per task instead of `label`), so the README's
walkthroughs start from a file exactly like the one a user brings. Copies of one image are written
once (the rule of `data.duplicates`, copies with different labels keeping the first: the file
then loads without the conflict error a user's own copies get). Files are copied (arrays are
written as PNG); the folder is written atomically.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from ..errors import DataError
from ..utils import atomic_path
from .duplicates import drop_duplicates
from .items import Dataset
from .source import FileSource


def export_manifest(splits: dict[str, Dataset], folder: str | os.PathLike, limit: int | None = None) -> Path:
    """splits -> folder/images/* + folder/labels.csv; `limit` keeps the first N items of each split."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"{folder}: exists and is not an empty folder")
    first = next(iter(splits.values()))
    kept = drop_duplicates(
        {s: ds.items[:limit] for s, ds in splits.items()}, str(folder), first.classnames, first.tasks, conflicts="first"
    )
    tasks = list(first.tasks) if len(first.tasks) >= 2 else []  # several tasks: task columns, no label column
    multi = first.multilabel
    with atomic_path(folder, is_dir=True) as tmp:
        (tmp / "images").mkdir(parents=True)
        rows = []
        for split, ds in splits.items():
            for i, it in enumerate(kept.get(split, [])):
                row: dict[str, str] = {}
                if it.image is None:
                    row["image"] = ""
                elif isinstance(it.image, FileSource):
                    src = Path(it.image.path)
                    rel = f"images/{split}-{i:05d}-{src.name}"
                    shutil.copyfile(src, tmp / rel)
                    row["image"] = rel
                else:  # a tar member, bytes or an array: its own bytes (arrays as PNG)
                    rel = f"images/{split}-{i:05d}.{it.image.suffix}"
                    (tmp / rel).write_bytes(it.image.read_bytes())
                    row["image"] = rel
                if multi:
                    row["labels"] = ",".join(ds.classnames[c] for c in (it.labels or ()))
                elif not tasks:
                    row["label"] = ds.classnames[it.label] if it.label is not None and it.label >= 0 else ""
                row["text"] = it.text or ""
                if split != "all":
                    row["split"] = split
                for t in tasks:
                    v = (it.tasks or {}).get(t, -1)
                    row[t] = ds.tasks[t][v] if v >= 0 else ""
                rows.append(row)
        fields = list(dict.fromkeys(k for r in rows for k in r))
        if not any(r.get("text") for r in rows):
            fields.remove("text")
        with open(tmp / "labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return folder / "labels.csv"
