"""From a data spec to the train / val / test Datasets of a fit: the one place that decides.

`vlclassify fit` / `eval` and `bench fewshot` all plan their splits here, so a spec, K and a
seed name the same items everywhere:

- a split file (`split_file`, e.g. a fit's `split.json`): exactly its items (data/splitfile.py);
- few-shot (`shots` = K): CoOp's sampling (data/splits.py `fewshot`) from the `train` split (or
  `all`), validation from the `val` split if there is one, else from the training images not
  sampled; test = the `test` split, or, for data without any split, every image not sampled;
- otherwise: the data's own splits, missing ones carved per class (`spec.train_val_test`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import DataError
from .items import Dataset
from .spec import load_data, train_val_test
from .splitfile import Splits, read_split_file
from .splits import fewshot_indices


def plan_splits(
    data: str | Mapping[str, Dataset],
    shots: int | None = None,
    seed: int = 1,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_file: str | os.PathLike | None = None,
    repeat: bool = False,
) -> Splits:
    """`train`, `val` and (when the data has test items) `test` Datasets for a fit.

    `data` is a data spec or the dict `load_data` returned. `repeat` samples short few-shot
    classes with replacement (Tip-Adapter's protocol). The result's `test_from` records where
    the test items come from, for `write_split_file`."""
    spec = data if isinstance(data, str) else None
    raw = load_data(data) if spec is not None else dict(data)
    if split_file is not None:
        return read_split_file(split_file, raw, spec)
    test_from = "test" if "test" in raw else ("all" if "all" in raw else None)
    if not shots:
        return Splits(train_val_test(raw, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction), test_from)
    if "train" in raw:
        pool, val_pool = raw["train"], raw.get("val")
    elif "all" in raw:
        pool, val_pool = raw["all"], None
    else:
        raise DataError(f"{spec or 'data'}: no 'train' (or 'all') split to sample {shots} shots from")
    tr, va = fewshot_indices(pool, shots, seed, val_pool, repeat)
    out = {"train": pool.subset(tr), "val": (pool if val_pool is None else val_pool).subset(va)}
    if "test" in raw:
        out["test"] = raw["test"]
    elif "all" in raw:
        used = set(tr) | set(va)
        out["test"] = pool.subset([i for i in range(len(pool)) if i not in used])
    return Splits(out, test_from)
