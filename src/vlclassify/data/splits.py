"""Few-shot sampling (the CoOp protocol) and stratified splits for data without them.

Sampling uses numpy's PCG64 generator, whose streams are the same on every platform, so a seed
gives the same images everywhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from .items import Dataset


def _class_indices(ds: Dataset) -> list[np.ndarray]:
    y = _primary_labels(ds)
    return [np.flatnonzero(y == c) for c in range(ds.num_classes)]


def _primary_labels(ds: Dataset) -> np.ndarray:
    """Single-label: the label; multi-label: the first label (used only to stratify)."""
    if ds.multilabel:
        return np.array([it.labels[0] if it.labels else -1 for it in ds.items], dtype=np.int64)
    return ds.labels()


def sample_per_class(ds: Dataset, k: int, seed: int, exclude: Sequence[int] = (), what: str = "train") -> np.ndarray:
    """K indices per class without replacement (all of them, with a warning, if fewer)."""
    if k < 1:
        raise DataError(f"shots must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    excluded = set(int(i) for i in exclude)
    chosen, short = [], []
    for c, idx in enumerate(_class_indices(ds)):
        idx = np.array([i for i in idx if i not in excluded], dtype=np.int64)
        if len(idx) < k:
            short.append(f"{ds.classnames[c]} ({len(idx)})")
            chosen.append(idx)
        else:
            chosen.append(np.sort(rng.choice(idx, size=k, replace=False)))
    if short:
        warnings.warn(
            f"{ds.name} {what}: fewer than {k} images for {', '.join(short)}; using all of them", stacklevel=2
        )
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def fewshot(train_pool: Dataset, shots: int, seed: int, val_pool: Dataset | None = None) -> tuple[Dataset, Dataset]:
    """CoOp few-shot split: K per class for training, min(K, 4) per class for validation.

    Validation comes from `val_pool` when the data has a val split, else from the images of
    `train_pool` not chosen for training.
    """
    tr = sample_per_class(train_pool, shots, seed, what="train")
    k_val = min(shots, 4)
    if val_pool is not None:
        va_ds = val_pool.subset(sample_per_class(val_pool, k_val, seed + 1, what="val"), name=f"{val_pool.name}")
    else:
        va_ds = train_pool.subset(sample_per_class(train_pool, k_val, seed + 1, exclude=tr, what="val"))
    train = train_pool.subset(tr)
    missing = [train.classnames[c] for c in range(train.num_classes) if not np.any(_primary_labels(train) == c)]
    if missing:
        raise DataError(f"{train_pool.name}: no training images for class(es) {', '.join(missing)}")
    return train, va_ds


def stratified_split(ds: Dataset, fractions: dict[str, float], seed: int) -> dict[str, Dataset]:
    """Split per class by `fractions` (e.g. {"train": .6, "val": .2, "test": .2}); every class keeps
    at least one training image when it has any."""
    rng = np.random.default_rng(seed)
    names = list(fractions)
    parts: dict[str, list[int]] = {n: [] for n in names}
    for idx in _class_indices(ds):
        idx = rng.permutation(idx)
        n = len(idx)
        counts = [int(np.floor(fractions[nm] * n)) for nm in names]
        counts[0] = n - sum(counts[1:])
        if counts[0] < 1 and n > 0:  # never starve the first (training) part
            for j in range(len(counts) - 1, 0, -1):
                if counts[j] > 0:
                    counts[j] -= 1
                    counts[0] += 1
                    break
        start = 0
        for nm, c in zip(names, counts):
            parts[nm] += idx[start : start + c].tolist()
            start += c
    return {nm: ds.subset(sorted(parts[nm])) for nm in names}


def kfold(ds: Dataset, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold (train_idx, test_idx) pairs."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for idx in _class_indices(ds):
        for j, i in enumerate(rng.permutation(idx)):
            folds[j % k].append(int(i))
    out = []
    for f in range(k):
        test = np.array(sorted(folds[f]), dtype=np.int64)
        train = np.array(sorted(i for g in range(k) if g != f for i in folds[g]), dtype=np.int64)
        out.append((train, test))
    return out
