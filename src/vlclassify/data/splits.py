"""Few-shot sampling (the CoOp protocol) and stratified splits for data without them.

Few-shot items are drawn exactly as CoOp's code draws them (Dassl's `generate_fewshot_dataset`
after `random.seed(seed)`), so a CoOp split file, K and a seed give the very images CoOp trains
on. Python's `random` (Mersenne Twister) gives the same stream on every platform; a private
`random.Random(seed)` gives that stream without touching the global generator.

The stratified splits and folds for data without splits use numpy's PCG64 (also the same on
every platform); they are not part of CoOp's protocol.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import DataError
from .items import Dataset


def _class_indices(ds: Dataset) -> list[np.ndarray]:
    y = _primary_labels(ds)
    return [np.flatnonzero(y == c) for c in range(ds.num_classes)]


def _primary_labels(ds: Dataset) -> np.ndarray:
    """Single-label: the label; multi-label: the first (smallest) label; -1 for unlabelled items."""
    if ds.multilabel:
        return np.array([it.labels[0] if it.labels else -1 for it in ds.items], dtype=np.int64)
    return ds.labels()


def dassl_sample(
    labels: Sequence[int], k: int, rng: random.Random, repeat: bool = False
) -> tuple[list[int], dict[int, int]]:
    """Positions chosen by Dassl's `generate_fewshot_dataset` on a list with these labels.

    Group the positions by label in order of first appearance; for each group in that order
    `rng.sample(group, k)`, or, when the group is shorter, the whole group (`repeat=False`) or
    `rng.choices(group, k=k)` (`repeat=True`, with replacement). The result is in that order
    (groups concatenated, each in the order drawn). Labels < 0 (unlabelled items) are skipped.
    Returns (positions, {label: group size} of the groups shorter than k).
    """
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        if y >= 0:
            groups.setdefault(int(y), []).append(i)
    chosen: list[int] = []
    short: dict[int, int] = {}
    for y, group in groups.items():
        if len(group) >= k:
            chosen += rng.sample(group, k)
        else:
            short[y] = len(group)
            chosen += rng.choices(group, k=k) if repeat else group
    return chosen, short


def _warn_short(ds: Dataset, k: int, counts: dict[int, int], what: str, repeat: bool) -> None:
    if counts:
        names = ", ".join(f"{ds.classnames[c]} ({n})" for c, n in sorted(counts.items()))
        how = "sampling them with replacement" if repeat else "using all of them"
        warnings.warn(f"{ds.name} {what}: fewer than {k} images for {names}; {how}", stacklevel=3)


def multilabel_sample(
    labels: Sequence[Sequence[int]], num_classes: int, k: int, rng: random.Random
) -> tuple[list[int], dict[int, int]]:
    """Positions giving every label at least `k` images (the K-shot rule for multi-label data, as
    multi-label few-shot papers state it; Dassl's per-class draw is defined for one label per image
    and, grouping by the first label, left labels that only come second with no image at all).

    Labels are served rarest first (ties by index); for each, images carrying it are drawn with
    `rng` until it has `k` among the chosen ones (an image drawn for one label counts for all its
    labels). Returns (positions in the order drawn, {label: images} of labels with fewer than k)."""
    having: list[list[int]] = [[] for _ in range(num_classes)]
    for i, ys in enumerate(labels):
        for y in ys:
            having[y].append(i)
    chosen: list[int] = []
    taken: set[int] = set()
    count = [0] * num_classes
    short: dict[int, int] = {}
    for c in sorted(range(num_classes), key=lambda c: (len(having[c]), c)):
        pool = [i for i in having[c] if i not in taken]
        if len(having[c]) < k:
            short[c] = len(having[c])
        while count[c] < k and pool:
            i = pool.pop(rng.randrange(len(pool)))
            chosen.append(i)
            taken.add(i)
            for y in labels[i]:
                count[y] += 1
    return chosen, short


def _sample(
    ds: Dataset, positions: Sequence[int], k: int, rng: random.Random, what: str, repeat: bool = False
) -> list[int]:
    """`dassl_sample` on the items of `ds` at `positions` (in that order) -> indices into `ds`;
    `multilabel_sample` for multi-label data."""
    if ds.multilabel:
        picked, short = multilabel_sample([ds.items[i].labels or () for i in positions], ds.num_classes, k, rng)
        _warn_short(ds, k, short, what, False)
        return [int(positions[j]) for j in picked]
    y = _primary_labels(ds)
    chosen, short = dassl_sample([int(y[i]) for i in positions], k, rng, repeat)
    present = {int(y[i]) for i in positions}
    short.update({c: 0 for c in range(ds.num_classes) if c not in present})  # absent classes: warn too
    _warn_short(ds, k, short, what, repeat)
    return [int(positions[j]) for j in chosen]


def sample_per_class(ds: Dataset, k: int, seed: int, exclude: Sequence[int] = (), what: str = "train") -> np.ndarray:
    """K indices per class, drawn as CoOp draws few-shot items (see `dassl_sample`); all of a
    class's images, with a warning, if it has fewer. Items at `exclude` are never drawn."""
    if k < 1:
        raise DataError(f"shots must be >= 1, got {k}")
    excluded = {int(i) for i in exclude}
    positions = [i for i in range(len(ds)) if i not in excluded]
    return np.array(_sample(ds, positions, k, random.Random(seed), what), dtype=np.int64)


def fewshot_indices(
    train_pool: Dataset,
    shots: int,
    seed: int,
    val_pool: Dataset | None = None,
    repeat: bool = False,
    draw_val: bool = True,
) -> tuple[list[int], list[int]]:
    """(train indices into `train_pool`, val indices into `val_pool`, or into `train_pool` when
    there is no val split): the items of `fewshot`, in the order CoOp lists them. `draw_val=False`
    draws the training items only (Tip-Adapter, which validates on the whole val split): val is []."""
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    rng = random.Random(seed)  # == random.seed(seed): nothing else draws before the sampling
    train = _sample(train_pool, range(len(train_pool)), shots, rng, "train", repeat)
    k_val = min(shots, 4)
    if not draw_val:
        val = []
    elif val_pool is not None:
        val = _sample(val_pool, range(len(val_pool)), k_val, rng, "val")
    else:  # the same procedure on the training images not sampled, in their order, same stream
        used = set(train)
        val = _sample(train_pool, [i for i in range(len(train_pool)) if i not in used], k_val, rng, "val")
    if train_pool.multilabel:
        have = {c for i in train for c in train_pool.items[i].labels or ()}
    else:
        have = set(_primary_labels(train_pool)[train].tolist())
    missing = [c for i, c in enumerate(train_pool.classnames) if i not in have]
    if missing:
        raise DataError(f"{train_pool.name}: no training images for class(es) {', '.join(missing)}")
    return train, val


def fewshot(
    data: Dataset | Mapping[str, Dataset],
    shots: int,
    seed: int,
    val_pool: Dataset | None = None,
    repeat: bool = False,
) -> tuple[Dataset, Dataset]:
    """CoOp few-shot split: K per class for training, min(K, 4) per class for validation.

    `data` is the dict of splits `load_data` returns (its `train`, or `all`, is the training
    pool and its `val`, if any, the validation pool) or a training Dataset (with `val_pool`).
    Exactly CoOp's items: `random.seed(seed)`; the pool's items grouped by label in order of
    first appearance; per group `random.sample(group, K)`, or the whole group if shorter (a
    warning; `repeat=True` samples short training classes with replacement instead, as
    Tip-Adapter does);
    then the val split the same way with min(K, 4), continuing the same stream. Without a val
    split, validation is drawn the same way from the training images not sampled, in their
    order, continuing the stream. Multi-label data: every label gets at least K training images
    (and min(K, 4) validation images) by `multilabel_sample`.
    """
    if isinstance(data, Mapping):
        if val_pool is not None:
            raise DataError("fewshot: pass the val split inside the dict of splits, not as val_pool")
        if "train" not in data and "all" not in data:
            raise DataError(f"fewshot: the data has no 'train' (or 'all') split; it has {', '.join(data) or 'none'}")
        train_pool = data["train"] if "train" in data else data["all"]
        val_pool = data.get("val") if "train" in data else None
    else:
        train_pool = data
    tr, va = fewshot_indices(train_pool, shots, seed, val_pool, repeat)
    return train_pool.subset(tr), (val_pool if val_pool is not None else train_pool).subset(va)


def stratified_split(ds: Dataset, fractions: dict[str, float], seed: int) -> dict[str, Dataset]:
    """Split per class by `fractions` (e.g. {"train": .6, "val": .2, "test": .2}); every class keeps
    at least one training image when it has any. A class too small to reach a later part (a class
    of one image has no val or test image) is named in one warning: its validation or test scores
    would be missing without a word."""
    rng = np.random.default_rng(seed)
    names = list(fractions)
    parts: dict[str, list[int]] = {n: [] for n in names}
    short: list[str] = []  # "cat (1 image: no val, test)"
    for c, idx in enumerate(_class_indices(ds)):
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
        for nm, k in zip(names, counts):
            parts[nm] += idx[start : start + k].tolist()
            start += k
        empty = [nm for nm, k in zip(names[1:], counts[1:]) if k == 0 and fractions[nm] > 0]
        if n > 0 and empty:
            short.append(f"{ds.classnames[c]} ({n} image{'s' if n > 1 else ''}: no {', '.join(empty)})")
    if short:
        warnings.warn(
            f"{ds.name}: class(es) too small to split {'/'.join(names)}: {'; '.join(short)}; "
            "add images to them, or give the splits yourself (train/ val/ test/ folders, a 'split' column)",
            stacklevel=2,
        )
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
