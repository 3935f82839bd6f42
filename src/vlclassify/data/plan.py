"""From a data spec to the train / val / test Datasets of a fit: the one place that decides.

`vlclassify fit` / `eval` and `bench fewshot` all plan their splits here, so a spec, K and a
seed name the same items everywhere:

- a split file (`split_file`, e.g. a fit's `split.json`): exactly its items (data/splitfile.py);
- few-shot (`shots` = K): CoOp's sampling (data/splits.py `fewshot`) from the `train` split (or
  `all`), validation from the `val` split if there is one, else from the training images not
  sampled; test = the `test` split, or, for data without any split, every image not sampled;
- otherwise: the data's own splits, missing ones carved per class (`spec.train_val_test`).

A `Protocol` (a preset's data side, protocols.py) changes three things, each named below:
short classes sampled with replacement, the whole val split as validation, and the data's own
class names and test split (CoOp's clean-up, e.g. ImageNet's `classnames.txt`, its val as test).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .items import Dataset
from .spec import load_data, parse_spec, train_val_test
from .splitfile import Splits, data_root, read_split_file
from .splits import fewshot_indices

VAL_RULES = ("fewshot", "full")


@dataclass(frozen=True)
class Protocol:
    """How a fit's splits are planned beyond K and the seed (the default: CoOp's sampling, the
    few-shot val, the data's class names as they are)."""

    repeat: bool = False  # short training classes sampled with replacement (Tip-Adapter), else all of them
    # fewshot: min(K, 4) per class of the val split (CoOp) | full: the whole val split (Tip-Adapter);
    # data without a val split takes min(K, 4) per class from the training images not sampled either way
    val: str = "fewshot"
    rename: Mapping[str, str] = field(default_factory=dict)  # class name -> CoOp's name (e.g. "Faces" -> "face")
    # for data given as a folder: a file of `folder class name` lines beside it (or one folder up)
    # naming the classes (CoOp's ImageNet classnames.txt: "n01440764 tench")
    classnames_file: str | None = None
    spaces: bool = False  # "_" in class names read as a space (CoOp's prompts)
    test_split: str | None = None  # data without a test split: this split is the test set (CoOp's ImageNet: val)

    def __post_init__(self) -> None:
        if self.val not in VAL_RULES:
            raise ConfigError(f"protocol: val must be one of {', '.join(VAL_RULES)}, got {self.val!r}")

    def describe(self) -> str:
        """One line for logs."""
        parts = [
            "short classes sampled with replacement" if self.repeat else "short classes: all their images",
            "validation: the whole val split" if self.val == "full" else "validation: min(K, 4) per class",
        ]
        if self.renames_classes():
            names = [
                w
                for w, on in (
                    ("CoOp's renames", self.rename),
                    (self.classnames_file or "", self.classnames_file),
                    ("'_' as a space", self.spaces),
                )
                if on
            ]
            parts.append("class names: " + ", ".join(names))
        if self.test_split:
            parts.append(f"test: the {self.test_split} split when there is no test split")
        return "; ".join(parts)

    def renames_classes(self) -> bool:
        """Whether the protocol changes class names (a rename table, a class file, or spaces)."""
        return bool(self.rename or self.classnames_file or self.spaces)

    def to_dict(self) -> dict[str, Any]:
        """JSON for fit.json and benchmark results (the presets' record)."""
        return {**dataclasses.asdict(self), "rename": dict(self.rename)}


DEFAULT = Protocol()


def read_classnames_file(spec: str, name: str) -> dict[str, str]:
    """`folder class name` lines (CoOp's ImageNet `classnames.txt`) -> {folder: class name}, from
    the data's folder or the one above it (CoOp's layout: imagenet/classnames.txt, imagenet/images/)."""
    root = data_root(spec)
    if root is None:
        raise DataError(f"{spec}: a built-in dataset has no {name} (it names its classes itself)")
    path = next((d / name for d in (root, root.parent) if (d / name).is_file()), None)
    if path is None:
        raise DataError(f"{spec}: no {name} in {root} or {root.parent} (lines 'folder class name', as CoOp's)")
    table: dict[str, str] = {}
    for i, line in enumerate(path.read_text().splitlines()):
        folder, _, cname = line.strip().partition(" ")
        if not folder:
            continue
        if not cname.strip():
            raise DataError(f"{path}: line {i + 1} {line!r} must be 'folder class name'")
        table[folder] = cname.strip()
    return table


def clean_classnames(names: Sequence[str], protocol: Protocol, spec: str | None = None) -> list[str]:
    """The protocol's class names: the class file's name for a folder, then `rename`, then "_" as
    a space. Idempotent: a clean name maps to itself."""
    table: dict[str, str] = {}
    if spec and protocol.classnames_file and Path(parse_spec(spec)[0]).is_dir():
        table = read_classnames_file(spec, protocol.classnames_file)
    if table:
        known = set(table) | set(table.values())
        missing = [n for n in names if n not in known]
        if missing:
            raise DataError(f"{spec}: class {missing[0]!r} is not in {protocol.classnames_file}")
    out = []
    for n in names:
        c = protocol.rename.get(table.get(n, n), table.get(n, n))
        out.append(c.replace("_", " ") if protocol.spaces else c)
    dup = next((c for c in out if out.count(c) > 1), None)
    if dup is not None:
        raise DataError(f"{spec or 'data'}: two classes are both named {dup!r} after the class-name clean-up")
    return out


def prepare_data(
    data: str | Mapping[str, Dataset], protocol: Protocol = DEFAULT, spec: str | None = None
) -> dict[str, Dataset]:
    """`load_data` plus the protocol's data side: its class names, the split scored as test.
    `data` is a spec or the dict `load_data` returned (then `spec` locates a class file).
    Applying it twice changes nothing."""
    if isinstance(data, str):
        spec, raw = data, load_data(data)
    else:
        raw = dict(data)
    if protocol.test_split and "test" not in raw and protocol.test_split in raw:
        raw["test"] = raw.pop(protocol.test_split)
    if not protocol.renames_classes() or not raw:
        return raw
    first = next(iter(raw.values()))
    clean = dict(zip(first.classnames, clean_classnames(first.classnames, protocol, spec)))
    out = {}
    for name, ds in raw.items():
        feats = ds.features
        if feats is not None:  # a feature file's class_text rows are looked up by the same names
            feats = dataclasses.replace(feats, class_names=[clean.get(c, c) for c in feats.class_names])
        tasks = {t: [clean.get(c, c) for c in cs] if cs == ds.classnames else cs for t, cs in ds.tasks.items()}
        out[name] = dataclasses.replace(
            ds, classnames=[clean.get(c, c) for c in ds.classnames], features=feats, tasks=tasks
        )
    return out


def plan_splits(
    data: str | Mapping[str, Dataset],
    shots: int | None = None,
    seed: int = 1,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_file: str | os.PathLike | None = None,
    protocol: Protocol = DEFAULT,
) -> Splits:
    """`train`, `val` and (when the data has test items) `test` Datasets for a fit.

    `data` is a data spec, loaded with `protocol`'s data side (`prepare_data`), or a dict of
    splits used as it is (what `load_data` or `prepare_data` returned). The result's `test_from`
    records where the test items come from, for `write_split_file`."""
    spec = data if isinstance(data, str) else None
    raw = prepare_data(data, protocol) if isinstance(data, str) else dict(data)
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
    full = protocol.val == "full" and val_pool is not None
    if protocol.val == "full" and not full:
        warnings.warn(
            f"{pool.name}: no val split to validate on whole; validation is min({shots}, 4) per class "
            "of the training images not sampled",
            stacklevel=2,
        )
    tr, va = fewshot_indices(pool, shots, seed, val_pool, protocol.repeat, draw_val=not full)
    val = val_pool if full and val_pool is not None else (pool if val_pool is None else val_pool).subset(va)
    out = {"train": pool.subset(tr), "val": val}
    if "test" in raw:
        out["test"] = raw["test"]
    elif "all" in raw:
        used = set(tr) | set(va)
        out["test"] = pool.subset([i for i in range(len(pool)) if i not in used])
    return Splits(out, test_from)
