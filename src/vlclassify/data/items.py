"""One item model for every kind of data vlclassify takes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError
from ..utils import json_fingerprint
from .classes import check_spellings
from .source import ImageSource, as_source

if TYPE_CHECKING:  # torch is imported where features are indexed: Item and Dataset serve the torch-free predict path
    import torch


@dataclass(frozen=True)
class Item:
    """One example: an image and/or a paired text, with its label(s) per task.

    `image` is where the image comes from (`data.source`: a file, a tar member, an array, bytes) or
    None (text only); a file path (str or PathLike) or a uint8 array [H, W] / [H, W, 3|4] given here
    becomes its source, so `Item(image="photos/x.jpg")` works as it always did."""

    image: ImageSource | None
    label: int | None = None  # single-label class index
    labels: tuple[int, ...] | None = None  # multi-label class indices
    text: str | None = None  # optional paired text (caption, product title)
    tasks: dict[str, int] | None = None  # per-task class index, for multi-task data
    key: str = ""  # stable identity (path + size + mtime, or source + index): the cache key
    origin: str = ""  # where the item was read ("labels.csv:17", a file path), for error messages only

    def __init__(
        self,
        image: ImageSource | str | os.PathLike[str] | np.ndarray | None,
        label: int | None = None,
        labels: tuple[int, ...] | None = None,
        text: str | None = None,
        tasks: dict[str, int] | None = None,
        key: str = "",
        origin: str = "",
    ) -> None:
        """The fields as declared; `image` may also be a path or a uint8 array: the boundary where a
        user's value becomes its source (`data.source.as_source`)."""
        fields = {"label": label, "labels": labels, "text": text, "tasks": tasks, "key": key, "origin": origin}
        object.__setattr__(self, "image", as_source(image, key or origin or "array"))
        for name, value in fields.items():
            object.__setattr__(self, name, value)


@dataclass
class PrecomputedFeatures:
    """Features read from a file, row-aligned with a Dataset's items."""

    path: str  # the file, named in errors
    image: torch.Tensor  # [N, D] float32 global image embeddings (joint space, not normalised)
    pooled: torch.Tensor | None = None  # [N, F] float32 raw pooled visual features
    spatial: torch.Tensor | None = None  # [N, P, D] float16 spatial tokens
    grid: tuple[int, int] | None = None  # (h, w) of the spatial tokens, h * w == P
    views: dict[str, PrecomputedFeatures] = field(default_factory=dict)  # augmented views, e.g. "flip"
    class_text: torch.Tensor | None = None  # [C, D] float32 class text embeddings (not indexed by rows)
    class_names: list[str] = field(default_factory=list)  # the class of each row of class_text

    def __len__(self) -> int:
        return self.image.shape[0]

    def index(self, idx: Sequence[int] | np.ndarray) -> PrecomputedFeatures:
        """The rows at `idx`, so splits of a feature file stay aligned with their items."""
        import torch

        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64).reshape(-1))

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, idx_t)

        return PrecomputedFeatures(
            path=self.path,
            image=self.image.index_select(0, idx_t),
            pooled=pick(self.pooled),
            spatial=pick(self.spatial),
            grid=self.grid,
            views={k: v.index(idx) for k, v in self.views.items()},
            class_text=self.class_text,
            class_names=self.class_names,
        )

    def text_for(self, classnames: list[str]) -> torch.Tensor | None:
        """[C, D] rows of `class_text` for these classes (looked up by name, so a re-indexed or
        reduced class list still gets its own rows), or None when the file has none."""
        if self.class_text is None:
            return None
        row = {c: i for i, c in enumerate(self.class_names)}
        missing = [c for c in classnames if c not in row]
        if missing:
            raise DataError(f"{self.path}: class_text has no row for class(es) {', '.join(map(repr, missing))}")
        return self.class_text[[row[c] for c in classnames]]


@dataclass
class Dataset:
    """Items with their class names (and tasks): what every loader returns and every method fits on."""

    items: list[Item]
    classnames: list[str]  # classes of the main task (`label` / `labels`)
    name: str = ""
    multilabel: bool = False
    tasks: dict[str, list[str]] = field(default_factory=dict)  # task -> its class names
    source: str = ""  # content signature of the files behind the items
    features: PrecomputedFeatures | None = None  # features read from a file, row-aligned (read by data/precomputed.py)

    def __post_init__(self) -> None:
        check_spellings(self.classnames, self.name or "data")
        for task, classes in self.tasks.items():
            check_spellings(classes, f"{self.name or 'data'}: task {task!r}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    @property
    def num_classes(self) -> int:
        """The main task's class count."""
        return len(self.classnames)

    def fingerprint(self) -> str:
        """Changes whenever the items, their labels or the files behind them change (not with `origin`)."""
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
            raise DataError(
                f"{self.name}: multi-label data (a 'labels' column) has no single label per item; "
                "this needs single-label data (a 'label' column)"
            )
        return np.array([-1 if it.label is None else it.label for it in self.items], dtype=np.int64)

    def multi_hot(self) -> np.ndarray:
        """[N, C] float32 0/1 targets (single-label data becomes one-hot)."""
        y = np.zeros((len(self.items), self.num_classes), dtype=np.float32)
        for i, it in enumerate(self.items):
            idx = it.labels if it.labels is not None else ((it.label,) if it.label is not None else ())
            y[i, list(idx)] = 1.0
        return y

    def task_labels(self, task: str) -> np.ndarray:
        """[N] class indices of task `task` (-1 where an item has none); errors name a missing task."""
        if task not in self.tasks:
            raise DataError(f"{self.name}: no task {task!r}; tasks: {', '.join(self.tasks) or 'none'}")
        return np.array([(it.tasks or {}).get(task, -1) for it in self.items], dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> Dataset:
        """The items at `indices` (precomputed features kept aligned), e.g. a split or a fold."""
        items = [self.items[int(i)] for i in indices]
        features = None if self.features is None else self.features.index(indices)
        return replace(self, items=items, name=name or self.name, features=features)

    def with_classes(self, classnames: Sequence[str]) -> Dataset:
        """The same items under a longer class list (labels re-indexed by name), e.g. a model's classes
        plus new ones; a class of this dataset missing from `classnames` is an error naming it."""
        names = list(classnames)
        index = {c: i for i, c in enumerate(names)}
        missing = [c for c in self.classnames if c not in index]
        if missing:
            raise DataError(f"{self.name}: class(es) {', '.join(missing)} not in {', '.join(names)}")
        if names == self.classnames:
            return self
        new = [index[c] for c in self.classnames]
        items = [
            replace(
                it,
                label=None if it.label is None or it.label < 0 else new[it.label],
                labels=None if it.labels is None else tuple(sorted(new[c] for c in it.labels)),
            )
            for it in self.items
        ]
        return replace(self, items=items, classnames=names)

    def texts(self) -> list[str]:
        """The items' paired texts, "" where an item has none."""
        return [it.text or "" for it in self.items]
