"""One item model for every kind of data vlclassify takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..utils import json_fingerprint


@dataclass(frozen=True)
class Item:
    image: str | np.ndarray | None  # file path, uint8 array [H, W] or [H, W, 3|4], or None (text only)
    label: int | None = None  # single-label class index
    labels: tuple[int, ...] | None = None  # multi-label class indices
    text: str | None = None  # optional paired text (caption, product title)
    tasks: dict[str, int] | None = None  # per-task class index, for multi-task data
    key: str = ""  # stable identity (path + size + mtime, or source + index): the cache key


@dataclass
class Dataset:
    items: list[Item]
    classnames: list[str]  # classes of the main task (`label` / `labels`)
    name: str = ""
    multilabel: bool = False
    tasks: dict[str, list[str]] = field(default_factory=dict)  # task -> its class names
    source: str = ""  # content signature of the files behind the items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def fingerprint(self) -> str:
        """Changes whenever the items, their labels or the files behind them change."""
        return json_fingerprint(
            [
                self.source,
                self.classnames,
                self.tasks,
                [(it.key, it.label, it.labels, it.text, it.tasks) for it in self.items],
            ]
        )

    def labels(self) -> np.ndarray:
        """[N] int64 class indices (single-label data)."""
        if self.multilabel:
            raise ValueError(f"{self.name}: multi-label data has no single label per item; use multi_hot()")
        return np.array([-1 if it.label is None else it.label for it in self.items], dtype=np.int64)

    def multi_hot(self) -> np.ndarray:
        """[N, C] float32 0/1 targets (single-label data becomes one-hot)."""
        y = np.zeros((len(self.items), self.num_classes), dtype=np.float32)
        for i, it in enumerate(self.items):
            idx = it.labels if it.labels is not None else ((it.label,) if it.label is not None else ())
            y[i, list(idx)] = 1.0
        return y

    def task_labels(self, task: str) -> np.ndarray:
        if task not in self.tasks:
            raise KeyError(f"{self.name}: no task {task!r}; tasks: {', '.join(self.tasks) or 'none'}")
        return np.array([(it.tasks or {}).get(task, -1) for it in self.items], dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> Dataset:
        return replace(self, items=[self.items[int(i)] for i in indices], name=name or self.name)

    def texts(self) -> list[str]:
        return [it.text or "" for it in self.items]
