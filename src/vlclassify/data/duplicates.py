"""Duplicate images, found by content hash when the data is read, before any split is made.

Two items are copies when their images have the same content (`ImageSource.hash`, whatever
the paths) and their texts are equal: they are then the same input to every method. Copies are
dropped so that one image can never sit on both sides of a split:

- the copy kept is the one in `test`, else `val`, else `train` (the user's evaluation rows stay
  as they are), the earliest row within a split;
- single-label copies with different labels, and copies with different values in a task column,
  are an error naming both rows; a copy without a label takes the other's;
- multi-label copies keep the union of their labels (rows that list an image's labels piecemeal).
  `conflicts="first"` (for writing out data that has such copies, as Tux Paint's fireman in both
  `military` and `people`) keeps the kept copy's label instead of raising.

One warning gives the count and the first pair. The same image with different texts is kept
twice (different inputs for text-aware methods). Only files whose size collides are hashed.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace

from ..errors import DataError
from .items import Item

KEEP_ORDER = {"test": 0, "val": 1, "train": 2, "all": 3}  # lower is kept


def _name(item: Item) -> str:
    return item.origin or (item.image.describe() if item.image is not None else item.key)


def _label_names(item: Item, classnames: Sequence[str]) -> str:
    return repr(classnames[item.label]) if item.label is not None else "no label"


def _merge(
    group: list[tuple[str, Item]],
    keep: int,
    classnames: Sequence[str],
    tasks: Mapping[str, Sequence[str]],
    conflicts: str,
) -> tuple[Item, bool]:
    """The kept copy with the labels of all copies; an error for copies that disagree."""
    first = group[0][1]
    if conflicts == "first":
        group = [group[keep]] + [e for j, e in enumerate(group) if j != keep and e[1].labels is not None]
        keep = 0
    label: int | None = None
    labels: set[int] = set()
    task_vals: dict[str, tuple[int, Item]] = {}  # task -> (value, the copy it came from)
    merged = False
    label_from: Item | None = None  # the copy `label` came from
    for _, it in group:
        if it.label is not None:
            if label_from is not None and it.label != label:
                raise DataError(
                    f"{_name(label_from)} and {_name(it)}: the same image with different labels "
                    f"{_label_names(label_from, classnames)} and {_label_names(it, classnames)}"
                )
            label, label_from = it.label, it
        if it.labels is not None:
            if labels and set(it.labels) != labels:
                merged = True
            labels |= set(it.labels)
        for t, v in (it.tasks or {}).items():
            prev = task_vals.setdefault(t, (v, it))
            if prev[0] != v:
                raise DataError(
                    f"{_name(prev[1])} and {_name(it)}: the same image with different values in task column "
                    f"{t!r}: {tasks[t][prev[0]]!r} and {tasks[t][v]!r}"
                )
    kept = group[keep][1]
    if first.labels is not None:
        kept = replace(kept, labels=tuple(sorted(labels)))
    elif label is not None:
        kept = replace(kept, label=label)
    if task_vals:
        kept = replace(kept, tasks={t: v for t, (v, _) in task_vals.items()})
    return kept, merged


def drop_duplicates(
    splits: Mapping[str, list[Item]],
    source: str,
    classnames: Sequence[str],
    tasks: Mapping[str, Sequence[str]] | None = None,
    conflicts: str = "error",
) -> dict[str, list[Item]]:
    """Split name -> items without copies of one image (see the module docstring); empty splits vanish.
    `conflicts`: "error" (copies with different labels or task values raise) or "first"."""
    if conflicts not in ("error", "first"):
        raise ValueError(f"conflicts must be 'error' or 'first', got {conflicts!r}")
    entries = [(s, it) for s, its in splits.items() for it in its]
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, (_, it) in enumerate(entries):
        if it.image is not None:
            by_size[it.image.size()].append(i)
    by_hash: dict[tuple[str, str], list[int]] = defaultdict(list)
    for idx in by_size.values():
        if len(idx) > 1:
            for i in idx:
                it = entries[i][1]
                assert it.image is not None  # only items with an image were sized
                by_hash[(it.image.hash(), it.text or "")].append(i)
    groups = sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: g[0])
    if not groups:
        return dict(splits)
    dropped: set[int] = set()
    kept_as: dict[int, Item] = {}
    n_across = n_merged = 0
    for g in groups:
        keep = min(range(len(g)), key=lambda j: (KEEP_ORDER[entries[g[j]][0]], g[j]))
        item, merged = _merge([entries[i] for i in g], keep, classnames, tasks or {}, conflicts)
        kept_as[g[keep]] = item
        dropped.update(i for j, i in enumerate(g) if j != keep)
        n_across += len({entries[i][0] for i in g}) > 1
        n_merged += merged
    a, b = (entries[i][1] for i in groups[0][:2])
    same = "the same file" if a.image == b.image else "the same file content"
    msg = f"{source}: {len(dropped)} duplicate image(s) dropped ({same} as another row, e.g. {_name(a)} and {_name(b)})"
    if n_across:
        msg += f"; {n_across} had copies in different splits: kept in test, else val, else train"
    if n_merged:
        msg += f"; the labels of the copies were merged for {n_merged} image(s)"
    warnings.warn(msg, stacklevel=3)
    out: dict[str, list[Item]] = {}
    for i, (s, it) in enumerate(entries):
        if i not in dropped:
            out.setdefault(s, []).append(kept_as.get(i, it))
    return out
