"""Real data that installs offline from Debian packages: Fashion-MNIST and Tux Paint stamps."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..utils import file_fingerprint, json_fingerprint
from .items import Dataset, Item
from .source import file_key

FASHION_MNIST_CLASSES = [
    "T-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
TUXPAINT_ROOT = "/usr/share/tuxpaint/stamps"
TUXPAINT_SKIP = {"cartoon", "symbols"}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, Dataset]:
    """Fashion-MNIST (Debian `dataset-fashion-mnist`): 60k train / 10k test, 28 x 28 grey."""
    root = Path(root or os.environ.get("VLCLASSIFY_FASHION_MNIST", FASHION_MNIST_ROOT))
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_p, lab_p = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        for p in (img_p, lab_p):
            if not p.exists():
                raise DataError(
                    f"{p}: not found; install Debian's dataset-fashion-mnist or pass root=<folder with the IDX files>"
                )
        images, labels = _read_idx(img_p), _read_idx(lab_p)
        if len(images) != len(labels):
            raise DataError(f"{img_p}: {len(images)} images but {len(labels)} labels")
        src = json_fingerprint([file_fingerprint(img_p, full=False), file_fingerprint(lab_p, full=False)])
        items = [
            Item(image=images[i], label=int(labels[i]), key=f"fashion-mnist/{split}/{i}") for i in range(len(images))
        ]
        out[split] = Dataset(items=items, classnames=list(FASHION_MNIST_CLASSES), name="fashion-mnist", source=src)
    return out


def tuxpaint_caption(txt: Path) -> str | None:
    """The English caption: the first line of the stamp's .txt that is not a `xx.utf8=` translation."""
    if not txt.exists():
        return None
    for line in txt.read_text(errors="replace").splitlines():
        line = line.strip()
        if line and "=" not in line.split(" ")[0]:
            return line
    return None


def tuxpaint(root: str | os.PathLike | None = None) -> dict[str, Dataset]:
    """Tux Paint stamp photos (Debian `tuxpaint-stamps-default`): PNGs outside `cartoon/` and `symbols/`.

    Main label: the top-level category (15). Task `subcategory`: `category/sub-folder`.
    Caption: the English line of the `.txt` beside each PNG. Transparency is pasted onto white.
    """
    root = Path(root or os.environ.get("VLCLASSIFY_TUXPAINT", TUXPAINT_ROOT))
    if not root.is_dir():
        raise DataError(f"{root}: not found; install Debian's tuxpaint-stamps-default or pass root=<stamps folder>")
    rows = []
    for p in sorted(root.rglob("*.png")):
        rel = p.relative_to(root)
        if TUXPAINT_SKIP & set(rel.parts[:-1]):
            continue
        if len(rel.parts) < 2:
            continue
        cat = rel.parts[0]
        sub = f"{cat}/{rel.parts[1]}" if len(rel.parts) > 2 else cat
        rows.append((p, cat, sub, tuxpaint_caption(p.with_suffix(".txt"))))
    if not rows:
        raise DataError(f"{root}: no photo stamps found")
    cats = sorted({r[1] for r in rows})
    subs = sorted({r[2] for r in rows})
    items = [
        Item(
            image=str(p),
            label=cats.index(c),
            text=cap,
            tasks={"category": cats.index(c), "subcategory": subs.index(s)},
            key=file_key(p),
        )
        for p, c, s, cap in rows
    ]
    ds = Dataset(
        items=items,
        classnames=cats,
        name="tuxpaint",
        tasks={"category": cats, "subcategory": subs},
        source=json_fingerprint(str(root)),
    )
    return {"all": ds}
