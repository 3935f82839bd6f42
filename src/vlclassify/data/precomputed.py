"""Precomputed features as data: `--data feats.safetensors` (or `.npz`), no image on disk.

Researchers who extracted CLIP features elsewhere (open_clip, clip-retrieval) fit every method
that works on cached features from one file. Entries (N items, C classes; docs/precomputed-features.md):

    image        [N, D]     float   global image embeddings in the joint space (required)
    labels       [N] int | [N, C] 0/1    class indices, or a multi-hot matrix (multi-label) (required)
    classnames   C names    safetensors metadata JSON list, or an npz string array (required)
    pooled       [N, F]     float   raw pooled visual features (default: `image` stands in)
    spatial      [N, P, D]  float   spatial tokens; `grid` [2] int (or metadata JSON) = (h, w), h*w == P
    split        [N] int 0/1/2 = train/val/test, or names (metadata JSON list / npz string array)
    class_text   [C, D]     float   class text embeddings, used instead of encoding prompts
    <view>.image, <view>.pooled, <view>.spatial   features of an augmented view, e.g. flip.image

Loading never unpickles (`np.load(..., allow_pickle=False)`, safetensors); a wrong shape, dtype
or value is a DataError naming the file and the entry. The Dataset of each split carries its
rows in `Dataset.features` and `extract_features` returns them instead of running the backbone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..utils import atomic_path, file_fingerprint, json_fingerprint
from .items import Dataset, Item, PrecomputedFeatures

SPLIT_CODES = ("train", "val", "test")  # split code i <-> SPLIT_CODES[i]
FEATURE_ENTRIES = ("image", "pooled", "spatial")  # per-item features, also per view as "<view>.<entry>"
OTHER_ENTRIES = ("labels", "split", "grid", "class_text", "classnames")
SUFFIXES = (".safetensors", ".npz")


def class_text_of(ds: Dataset) -> torch.Tensor | None:
    """[C, D] the precomputed class text embeddings of `ds`'s classes, or None (encode prompts)."""
    return None if ds.features is None else ds.features.text_for(list(ds.classnames))


# ---- reading --------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(numeric entries as tensors, string entries: classnames / split / grid as Python values)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        strings: dict[str, Any] = {}
        for k in ("classnames", "split", "grid"):
            if k in meta:
                try:
                    strings[k] = json.loads(meta[k])
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: metadata {k!r} is not JSON ({e.msg})") from None
        return tensors, strings
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    tensors, strings = {}, {}
    with npz:
        for k in npz.files:
            try:
                arr = npz[k]
            except ValueError as e:  # object arrays need pickle: refused
                raise DataError(f"{path}: entry {k!r} cannot be read without unpickling ({e})") from None
            if arr.dtype.kind in "US":
                strings[k] = arr.astype(str).tolist()
            elif arr.dtype.kind in "biuf":
                tensors[k] = torch.from_numpy(np.ascontiguousarray(arr))
            else:
                raise DataError(f"{path}: entry {k!r} has unsupported dtype {arr.dtype}")
    return tensors, strings


def _desc(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _float(path: Path, name: str, t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Check a float entry against `shape` (None = any size) -> float32, every value finite."""
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if not t.is_floating_point():
        raise DataError(f"{path}: {name!r} must be a float tensor {want}, got {_desc(t)}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        raise DataError(f"{path}: {name!r} must have shape {want}, got {_desc(t)}")
    t = t.float()
    bad = ~torch.isfinite(t)
    if bad.any():
        row = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0, 0])
        raise DataError(f"{path}: {name!r} has NaN or infinite values (first at row {row})")
    return t


def _integers(path: Path, name: str, t: torch.Tensor) -> np.ndarray:
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise DataError(f"{path}: {name!r} must be an integer tensor, got {_desc(t)}")
    return t.numpy().astype(np.int64)


def _labels(path: Path, t: torch.Tensor, n: int, c: int) -> tuple[list[int] | None, list[tuple[int, ...]] | None]:
    """(single labels, None) or (None, multi-label index tuples)."""
    if t.dim() == 1:
        y = _integers(path, "labels", t)
        if len(y) != n:
            raise DataError(f"{path}: 'labels' has {len(y)} rows but 'image' has {n}")
        bad: np.ndarray = np.flatnonzero((y < 0) | (y >= c))
        if len(bad):
            raise DataError(f"{path}: labels[{bad[0]}] = {y[bad[0]]} is not a class index 0..{c - 1} ({c} classnames)")
        return y.tolist(), None
    if t.dim() == 2:
        if t.shape != (n, c):
            raise DataError(f"{path}: multi-hot 'labels' must have shape [{n}, {c}] ([N, C]), got {_desc(t)}")
        m = t.float().numpy()
        bad = np.argwhere((m != 0) & (m != 1))
        if len(bad):
            raise DataError(f"{path}: multi-hot labels[{bad[0][0]}, {bad[0][1]}] = {m[tuple(bad[0])]} is not 0 or 1")
        return None, [tuple(np.flatnonzero(r).tolist()) for r in m]
    raise DataError(f"{path}: 'labels' must be [N] class indices or an [N, C] multi-hot matrix, got {_desc(t)}")


def _split(path: Path, tensors: dict, strings: dict, n: int) -> np.ndarray | None:
    """[N] split codes 0/1/2 (train/val/test), or None when the file has no split."""
    if "split" in tensors:
        codes = _integers(path, "split", tensors["split"])
        if codes.shape != (n,):
            raise DataError(f"{path}: 'split' must have shape [{n}], got {_desc(tensors['split'])}")
        bad = np.flatnonzero((codes < 0) | (codes > 2))
        if len(bad):
            raise DataError(f"{path}: split[{bad[0]}] = {codes[bad[0]]}; codes are 0 train, 1 val, 2 test")
        return codes
    if "split" in strings:
        names = strings["split"]
        if not isinstance(names, list) or len(names) != n:
            raise DataError(f"{path}: 'split' must list {n} split names, got {type(names).__name__}")
        wrong = [i for i, s in enumerate(names) if s not in SPLIT_CODES]
        if wrong:
            raise DataError(f"{path}: split[{wrong[0]}] = {names[wrong[0]]!r}; use train, val or test")
        return np.array([SPLIT_CODES.index(s) for s in names], dtype=np.int64)
    return None


def _grid(path: Path, tensors: dict, strings: dict, p: int) -> tuple[int, int]:
    if "grid" in tensors:
        g = _integers(path, "grid", tensors["grid"]).reshape(-1).tolist()
    elif "grid" in strings:
        g = strings["grid"]
    else:
        side = int(round(p**0.5))
        if side * side != p:
            raise DataError(f"{path}: 'spatial' has {p} tokens, not a square: give 'grid' = (h, w)")
        return side, side
    if not (isinstance(g, list) and len(g) == 2 and all(isinstance(v, int) for v in g) and g[0] * g[1] == p):
        raise DataError(f"{path}: 'grid' must be (h, w) with h * w = {p} spatial tokens, got {g!r}")
    return g[0], g[1]


def _features(path: Path, tensors: dict, strings: dict, prefix: str, n: int | None, d: int | None) -> tuple:
    """(image, pooled, spatial, grid) of the main entries (prefix "") or of a view ("flip.")."""
    image = _float(path, prefix + "image", tensors[prefix + "image"], (n, d))
    n, d = image.shape
    pooled = spatial = grid = None
    if prefix + "pooled" in tensors:
        pooled = _float(path, prefix + "pooled", tensors[prefix + "pooled"], (n, None))
    if prefix + "spatial" in tensors:
        spatial = _float(path, prefix + "spatial", tensors[prefix + "spatial"], (n, None, d)).half()
        grid = _grid(path, tensors, strings, spatial.shape[1])
    return image, pooled, spatial, grid


def load_precomputed(path: str | os.PathLike, name: str | None = None) -> dict[str, Dataset]:
    """The splits of a precomputed-feature file (`train`/`val`/`test` from its `split`, else `all`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: precomputed features must be .safetensors or .npz")
    tensors, strings = _read(path)
    views = sorted({k.split(".", 1)[0] for k in tensors if "." in k})
    known = set(FEATURE_ENTRIES + OTHER_ENTRIES) | {f"{v}.{e}" for v in views for e in FEATURE_ENTRIES}
    unknown = sorted(set(tensors) - known) + sorted(set(strings) - {"classnames", "split", "grid"})
    if unknown:
        raise DataError(
            f"{path}: unknown entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(FEATURE_ENTRIES + OTHER_ENTRIES)} and <view>.image / .pooled / .spatial"
        )
    for required in ("image", "labels"):
        if required not in tensors:
            raise DataError(f"{path}: missing the {required!r} entry")
    classnames = strings.get("classnames")
    if classnames is None:
        where = "a 'classnames' metadata JSON list" if path.suffix.lower() == ".safetensors" else "a 'classnames' array"
        raise DataError(f"{path}: no class names; add {where}")
    if not (isinstance(classnames, list) and classnames and all(isinstance(c, str) and c for c in classnames)):
        raise DataError(f"{path}: 'classnames' must be a non-empty list of non-empty strings")
    if len(set(classnames)) != len(classnames):
        dup = next(c for c in classnames if classnames.count(c) > 1)
        raise DataError(f"{path}: class name {dup!r} appears more than once in 'classnames'")
    image, pooled, spatial, grid = _features(path, tensors, strings, "", None, None)
    n, d = image.shape
    c = len(classnames)
    labels, multi = _labels(path, tensors["labels"], n, c)
    class_text = None
    if "class_text" in tensors:
        class_text = _float(path, "class_text", tensors["class_text"], (c, d))
    pre = PrecomputedFeatures(
        path=str(path),
        image=image,
        pooled=pooled,
        spatial=spatial,
        grid=grid,
        class_text=class_text,
        class_names=list(classnames),
    )
    for v in views:
        if f"{v}.image" not in tensors:
            raise DataError(f"{path}: view {v!r} has no '{v}.image' entry")
        vi, vp, vs, vg = _features(path, tensors, strings, f"{v}.", n, d)
        if (vp is None) != (pooled is None):
            raise DataError(f"{path}: view {v!r} must have '{v}.pooled' exactly when the file has 'pooled'")
        pre.views[v] = PrecomputedFeatures(path=str(path), image=vi, pooled=vp, spatial=vs, grid=vg)
    codes = _split(path, tensors, strings, n)
    items = [
        Item(
            image=None,
            label=None if labels is None else labels[i],
            labels=None if multi is None else multi[i],
            key=f"{path.name}#{i}",
        )
        for i in range(n)
    ]
    full = Dataset(
        items=items,
        classnames=list(classnames),
        name=name or path.stem,
        multilabel=multi is not None,
        source=json_fingerprint([str(path.resolve()), file_fingerprint(path, full=False)]),
        features=pre,
    )
    if codes is None:
        return {"all": full}
    return {s: full.subset(np.flatnonzero(codes == i)) for i, s in enumerate(SPLIT_CODES) if np.any(codes == i)}


# ---- writing --------------------------------------------------------------------------------


def save_precomputed(
    path: str | os.PathLike,
    image: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    classnames: list[str],
    pooled: torch.Tensor | None = None,
    spatial: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    split: list[str] | np.ndarray | torch.Tensor | None = None,
    class_text: torch.Tensor | None = None,
    views: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a precomputed-feature file (.safetensors or .npz, by suffix) that `load_precomputed`
    reads back; checked by reading it back before it replaces `path`. `split`: names or codes."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: precomputed features must be .safetensors or .npz")
    as_t = lambda x: torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x  # noqa: E731
    tensors = {"image": image, "labels": as_t(labels)}
    tensors.update(
        {k: v for k, v in (("pooled", pooled), ("spatial", spatial), ("class_text", class_text)) if v is not None}
    )
    for v, entries in (views or {}).items():
        tensors.update({f"{v}.{k}": t for k, t in entries.items()})
    strings: dict[str, Any] = {"classnames": list(classnames)}
    if grid is not None:
        strings["grid"] = [int(grid[0]), int(grid[1])]
    if split is not None:
        if isinstance(split, (list, tuple)) and split and isinstance(split[0], str):
            strings["split"] = list(split)
        else:
            tensors["split"] = as_t(split).to(torch.int64)
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in strings.items()})
        else:
            arrays = {k: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for k, t in tensors.items()}
            arrays.update({k: np.array(v) for k, v in strings.items()})
            with open(tmp, "wb") as f:
                np.savez(f, allow_pickle=True, **arrays)  # numpy's default, spelt out so **arrays cannot bind it
        try:
            load_precomputed(tmp)  # a file that would not load is never left behind
        except DataError as e:
            raise DataError(str(e).replace(str(tmp), str(path))) from None
    return path
