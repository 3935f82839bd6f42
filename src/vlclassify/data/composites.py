"""Multi-label benchmark data built reproducibly from installed single-label data.

    fmnist-mosaic        2x2 mosaics of 2-4 Fashion-MNIST items; labels = the classes present
    tuxpaint-composite   1-3 Tux Paint photo cut-outs (alpha channel = mask) pasted on a canvas;
                         labels = their top-level categories

Sources are split before composing (Fashion-MNIST: train pool / val pool / official test set;
Tux Paint: the photos of each category split train/val/test), so no source image appears in
two splits. Images and a JSONL manifest (`image`, `labels`, `split`) are generated once, with
fixed seeds (numpy PCG64, identical on every platform), into an atomically written folder under
`<cache>/composites/` (or `out=`), then read back with the ordinary manifest loader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..utils import atomic_path, default_cache_dir, json_fingerprint
from .items import Dataset
from .source import ArraySource, FileSource

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")


def _int(name: str, value, lo: int = 1) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise DataError(f"composite option {name}={value!r}: expected an integer") from None
    if v < lo:
        raise DataError(f"composite option {name}={v}: must be >= {lo}")
    return v


def _materialise(
    name: str, params: dict, out: str | os.PathLike | None, build: Callable[[Path], list[dict]], classnames: list[str]
) -> dict[str, Dataset]:
    """Generate into `<out or cache>/composites/<name>-<hash>/` once (atomically), then load it."""
    from .loaders import manifest

    folder = Path(out) if out else default_cache_dir() / "composites" / f"{name}-{json_fingerprint(params)}"
    man = folder / "manifest.jsonl"
    meta = folder / "meta.json"
    if out and folder.exists() and any(folder.iterdir()) and not meta.exists():
        raise DataError(f"{folder}: exists and is not a composite folder; pass an empty or new out= folder")
    if not (man.exists() and meta.exists() and json.loads(meta.read_text()).get("params") == params):
        with atomic_path(folder, is_dir=True) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            rows = build(tmp)
            (tmp / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (tmp / "meta.json").write_text(
                json.dumps(
                    {
                        "params": params,
                        "classnames": classnames,
                        "counts": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
                    },
                    indent=1,
                )
                + "\n"
            )
    splits = manifest(man, classes=classnames)
    for ds in splits.values():
        ds.name = name
    return splits


# ---- Fashion-MNIST mosaics ---------------------------------------------------------------------
def fmnist_mosaic(
    n_train: int = 1000,
    n_val: int = 300,
    n_test: int = 500,
    seed: int = 0,
    cell: int = 28,
    min_items: int = 2,
    max_items: int = 4,
    root: str | None = None,
    out: str | None = None,
) -> dict[str, Dataset]:
    """2x2 mosaics (each cell `cell` px) holding 2-4 Fashion-MNIST items in random cells, black elsewhere.

    Train and val draw from disjoint parts of Fashion-MNIST's train set, test from its test set.
    Labels are the distinct classes present (two T-shirts give one label).
    """
    from .builtin import FASHION_MNIST_CLASSES, fashion_mnist

    n = {"train": _int("n_train", n_train), "val": _int("n_val", n_val), "test": _int("n_test", n_test)}
    seed, cell = _int("seed", seed, 0), _int("cell", cell, 8)
    lo, hi = _int("min_items", min_items), _int("max_items", max_items)
    if not lo <= hi <= 4:
        raise DataError(f"fmnist-mosaic: need 1 <= min_items <= max_items <= 4, got {lo}..{hi}")
    src = fashion_mnist(root)
    params = {
        "v": GENERATOR_VERSION,
        "kind": "fmnist-mosaic",
        "n": n,
        "seed": seed,
        "cell": cell,
        "items": [lo, hi],
        "source": [src["train"].source, src["test"].source],
    }

    def build(folder: Path) -> list[dict]:
        rng = np.random.default_rng(seed)
        tr = src["train"]
        perm = rng.permutation(len(tr))
        cut = len(tr) // 6  # 10k of 60k reserved as the validation pool
        pools = {"train": (tr, perm[cut:]), "val": (tr, perm[:cut]), "test": (src["test"], np.arange(len(src["test"])))}
        rows = []
        for split in SPLITS:
            ds, pool = pools[split]
            y = ds.labels()  # [N] class indices
            (folder / split).mkdir()
            for i in range(n[split]):
                k = int(rng.integers(lo, hi + 1))
                cells = rng.choice(4, size=k, replace=False)
                picks = rng.choice(pool, size=k, replace=False)
                canvas = np.zeros((2 * cell, 2 * cell), dtype=np.uint8)
                for c, j in zip(cells, picks):
                    cell_src = ds.items[int(j)].image
                    assert isinstance(cell_src, ArraySource)  # fashion_mnist() items hold arrays
                    img = cell_src.array  # [28, 28] uint8
                    if cell != img.shape[0]:
                        img = np.asarray(Image.fromarray(img).resize((cell, cell), Image.Resampling.BILINEAR))
                    r0, c0 = (int(c) // 2) * cell, (int(c) % 2) * cell
                    canvas[r0 : r0 + cell, c0 : c0 + cell] = img
                rel = f"{split}/{i:05d}.png"
                Image.fromarray(canvas, "L").save(folder / rel)
                labels = sorted({FASHION_MNIST_CLASSES[y[int(j)]] for j in picks})
                rows.append({"image": rel, "labels": labels, "split": split})
        return rows

    return _materialise("fmnist-mosaic", params, out, build, list(FASHION_MNIST_CLASSES))


# ---- Tux Paint composites ----------------------------------------------------------------------
def split_photos(
    labels: np.ndarray, num_classes: int, rng: np.random.Generator, fractions: tuple[float, float] = (0.2, 0.2)
) -> dict[str, list[int]]:
    """Per class: val/test get round(fraction * n) photos but at least 1 each when n >= 3."""
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c)).tolist()
        n = len(idx)
        n_val = max(1, round(fractions[0] * n)) if n >= 3 else 0
        n_test = max(1, round(fractions[1] * n)) if n >= 3 else 0
        out["val"] += idx[:n_val]
        out["test"] += idx[n_val : n_val + n_test]
        out["train"] += idx[n_val + n_test :]
    return {s: sorted(v) for s, v in out.items()}


def _cutout(path: str, max_side: int) -> Image.Image:
    """RGBA photo cropped to its alpha bounding box and shrunk to `max_side` (the mask is the alpha)."""
    try:
        with Image.open(path) as f:
            im = f.convert("RGBA")
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    box = im.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
    if box is None:
        raise DataError(f"{path}: fully transparent, no cut-out")
    im = im.crop(box)
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return im


def tuxpaint_composite(
    n_train: int = 800,
    n_val: int = 200,
    n_test: int = 400,
    seed: int = 0,
    size: int = 224,
    min_items: int = 1,
    max_items: int = 3,
    root: str | None = None,
    out: str | None = None,
) -> dict[str, Dataset]:
    """`size` x `size` canvases with 1-3 Tux Paint photo cut-outs of distinct categories.

    Categories are drawn with probability proportional to sqrt(#photos) (rare ones appear
    often enough to be scored), a photo uniformly within its category and split. Each cut-out
    is scaled so its longer side is 40-65% of the canvas and placed at random, trying to keep
    overlap with earlier ones small; the background is a random light colour.
    """
    from .builtin import tuxpaint

    n = {"train": _int("n_train", n_train), "val": _int("n_val", n_val), "test": _int("n_test", n_test)}
    seed, size = _int("seed", seed, 0), _int("size", size, 32)
    lo, hi = _int("min_items", min_items), _int("max_items", max_items)
    src = tuxpaint(root)["all"]
    if not lo <= hi <= src.num_classes:
        raise DataError(f"tuxpaint-composite: need 1 <= min_items <= max_items <= {src.num_classes}, got {lo}..{hi}")
    labels = np.array([it.label for it in src.items])
    params = {
        "v": GENERATOR_VERSION,
        "kind": "tuxpaint-composite",
        "n": n,
        "seed": seed,
        "size": size,
        "items": [lo, hi],
        "source": src.fingerprint(),
    }

    def build(folder: Path) -> list[dict]:
        rng = np.random.default_rng(seed)
        photo_split = split_photos(labels, src.num_classes, rng)
        cut: dict[int, Image.Image] = {}
        rows = []
        for split in SPLITS:
            by_cat = {c: [i for i in photo_split[split] if labels[i] == c] for c in range(src.num_classes)}
            cats = np.array([c for c in range(src.num_classes) if by_cat[c]])
            if len(cats) < hi:
                raise DataError(f"tuxpaint-composite: split {split} has photos of only {len(cats)} categories")
            w = np.sqrt([len(by_cat[c]) for c in cats])
            (folder / split).mkdir()
            for i in range(n[split]):
                k = int(rng.integers(lo, hi + 1))
                chosen = rng.choice(cats, size=k, replace=False, p=w / w.sum())
                bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
                canvas = Image.new("RGBA", (size, size), bg + (255,))
                boxes: list[tuple[int, int, int, int]] = []
                for c in chosen:
                    j = int(rng.choice(by_cat[int(c)]))
                    if j not in cut:
                        stamp = src.items[j].image
                        assert isinstance(stamp, FileSource)  # tuxpaint() items are files
                        cut[j] = _cutout(stamp.path, 2 * size)
                    im = cut[j].copy()
                    side = int(rng.uniform(0.40, 0.65) * size)
                    scale = side / max(im.size)
                    im = im.resize(
                        (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS
                    )
                    best: tuple[float, tuple[int, int, int, int]] | None = None  # (overlap, box)
                    for _ in range(12):
                        x = int(rng.integers(0, size - im.width + 1))
                        y = int(rng.integers(0, size - im.height + 1))
                        box = (x, y, x + im.width, y + im.height)
                        ov = max((_overlap(box, b) for b in boxes), default=0.0)
                        if best is None or ov < best[0]:
                            best = (ov, box)
                        if ov < 0.15:
                            break
                    assert best is not None  # the loop above ran
                    box = best[1]
                    canvas.alpha_composite(im, dest=box[:2])
                    boxes.append(box)
                rel = f"{split}/{i:05d}.png"
                canvas.convert("RGB").save(folder / rel)
                rows.append({"image": rel, "labels": sorted(src.classnames[int(c)] for c in chosen), "split": split})
        return rows

    return _materialise("tuxpaint-composite", params, out, build, list(src.classnames))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / max(1, small)
