"""Which images to label next: a pool of unlabelled images in, the most useful ones to label out.

Strategies (`choose`):

    typical   TypiClust: k-means over the pool's embeddings with k = labelled + n; from the largest
              clusters that hold no labelled image, the most typical image (densest neighbourhood).
              Needs no model and no label: the cold start.
    margin    the images whose top two scores are closest, spread over k-means clusters of the
              most uncertain candidates (one per cluster), so a batch is not n near-copies
    entropy   as margin, with the entropy of the scores as the uncertainty
    coreset   k-center greedy: each pick the image farthest from everything labelled or picked
    random    uniform, the baseline
    auto      typical while fewer than AUTO_SWITCH labels per class exist (or there is no model
              that learnt from images), then margin: the rule measured by
              benchmarks/studies/active_learning.py (docs/labelling.md)

Everything is deterministic for a seed. Images already labelled (a labels CSV, the training and
validation items of a model's split.json) are never suggested. The pool is read through the
feature store: extracted once, read back on every later call.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .data.items import Dataset, Item
from .data.source import FileSource
from .errors import ConfigError, DataError
from .utils import atomic_path, read_json

if TYPE_CHECKING:
    from .backbones.base import Backbone
    from .context import RunContext
    from .methods.base import Method

STRATEGIES = ("auto", "typical", "margin", "entropy", "coreset", "random")
NEEDS_MODEL = ("margin", "entropy")
AUTO_SWITCH = 4.0  # labels per class from which `auto` turns from typical to margin (measured: docs/labelling.md)
TYPICAL_NEIGHBOURS = 20  # TypiClust's K: typicality = 1 / mean distance to the K nearest neighbours
CANDIDATES_PER_PICK = 10  # margin / entropy: the n * 10 most uncertain images are clustered into n groups
KMEANS_ITERS = 30


@dataclass(frozen=True)
class Suggestion:
    """One image to label: its pool row, its name (the `image` column), the model's guess."""

    index: int
    image: str
    strategy: str  # the strategy that chose it (`auto` resolved)
    guess: str | None = None
    score: float | None = None


# ---- the pool and what is labelled already ------------------------------------------------------
def load_pool(spec: str) -> Dataset:
    """Every image of a data spec, labels ignored. A folder is read whole, sub-folders included
    (an unlabelled folder has no class sub-folders); any other spec is `load_data`'s, splits joined."""
    from .data.decoder import IMAGE_EXTS
    from .data.source import file_key
    from .data.spec import load_data, parse_spec

    base, opts = parse_spec(spec)
    root = Path(base)
    if root.is_dir() and not opts:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DataError(f"{root}: no images in the folder ({', '.join(sorted(IMAGE_EXTS))})")
        items = [Item(image=FileSource(str(p.resolve())), key=file_key(p), origin=str(p)) for p in files]
        return Dataset(items=items, classnames=[], name=root.name)
    splits = load_data(spec)
    seen: set[str] = set()
    items = []
    for ds in splits.values():
        for it in ds.items:
            if it.key not in seen:
                seen.add(it.key)
                items.append(Item(image=it.image, text=it.text, key=it.key, origin=it.origin))
    first = next(iter(splits.values()))
    return Dataset(items=items, classnames=[], name=first.name, source=first.source)


def item_name(item: Item) -> str:
    """An item's `image` value: the absolute path of its file, else its key (built-in arrays)."""
    return os.path.abspath(item.image.path) if isinstance(item.image, FileSource) else item.key


def labelled_in_csv(path: str | os.PathLike) -> set[str]:
    """The images of a labels CSV's `image` column, as `item_name` writes them (paths relative to the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "image" not in (reader.fieldnames or []):
            raise DataError(f"{path}: needs an 'image' column (found: {', '.join(reader.fieldnames or [])})")
        names = [(row.get("image") or "").strip() for row in reader]
    return {_resolve(n, path.parent) for n in names if n}


def labelled_by_model(model_dir: str | os.PathLike) -> set[str]:
    """The train and validation images of a model folder's split.json (none for a names-only model)."""
    from .data.splitfile import data_root

    path = Path(model_dir) / "split.json"
    if not path.is_file():
        return set()
    split = read_json(path)
    if not isinstance(split, dict):
        raise DataError(f"{path}: expected a JSON object")
    root = data_root(split.get("data"))
    rows = [*(split.get("train") or []), *(split.get("val") or [])]
    return {_resolve(str(r[0]), root) for r in rows if isinstance(r, list) and r}


def _resolve(name: str, root: Path | None) -> str:
    """A path relative to `root` made absolute; keys (`fashion-mnist/train/3`) that name no file stay as they are."""
    if os.path.isabs(name):
        return os.path.abspath(name)
    if root is not None and (root / name).exists():
        return os.path.abspath(root / name)
    return name


# ---- features and scores -------------------------------------------------------------------------
def pool_embeddings(backbone: Backbone, pool: Dataset, ctx: RunContext | None = None) -> np.ndarray:
    """[N, F] L2-normalised pooled features of the pool (the probe's input), through the feature store."""
    from .context import RunContext
    from .features import extract_features

    ctx = ctx or RunContext()
    feats = extract_features(
        backbone, pool, cache=ctx.cache, progress=ctx.progress, runtime=ctx.runtime, skip_bad=ctx.skip_bad
    )
    x = feats.pooled.float()  # [N, F]
    return torch.nn.functional.normalize(x, dim=-1).numpy()


def model_scores(method: Method, pool: Dataset, ctx: RunContext | None = None) -> np.ndarray:
    """[N, C] the model's scores of every pool image (softmax, or sigmoid for multi-label models)."""
    return np.asarray(method.predict_proba(pool.with_classes(method.classnames), ctx=ctx), dtype=np.float64)


# ---- the strategies -----------------------------------------------------------------------------
def auto_strategy(labelled: int, num_classes: int, learnt_from_images: bool) -> str:
    """`auto`'s choice: typical at a cold start, margin once the model learnt from AUTO_SWITCH labels per class."""
    if not learnt_from_images or num_classes < 1 or labelled < AUTO_SWITCH * num_classes:
        return "typical"
    return "margin"


def choose(
    emb: np.ndarray,
    labelled: np.ndarray,
    n: int,
    strategy: str,
    probs: np.ndarray | None = None,
    seed: int = 1,
    multilabel: bool = False,
) -> list[int]:
    """Rows of `emb` [N, F] to label next, best first: `n` of those not `labelled` [N] bool.

    `probs` [N, C] are a model's scores (needed by margin and entropy); auto is resolved by the
    caller (`auto_strategy`), so this takes a concrete strategy."""
    if strategy not in STRATEGIES or strategy == "auto":
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES[1:])} here, got {strategy!r}")
    free = np.flatnonzero(~labelled)
    n = min(n, len(free))
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    if strategy == "random":
        return [int(i) for i in rng.choice(free, size=n, replace=False)]
    if strategy == "typical":
        return _typical(emb, labelled, n, rng)
    if strategy == "coreset":
        return _coreset(emb, labelled, n, rng)
    if probs is None:
        raise ConfigError(f"strategy {strategy} ranks by a model's scores: give a model (--model)")
    u = uncertainty(probs, strategy, multilabel)
    return _diverse_uncertain(emb, free, u, n, rng)


def uncertainty(probs: np.ndarray, strategy: str, multilabel: bool = False) -> np.ndarray:
    """[N] how unsure the model is (higher: more): 1 - (top1 - top2) for margin, the entropy for
    entropy; multi-label scores are independent yes/no answers, so their closeness to 0.5."""
    p = np.clip(probs, 1e-12, 1.0)
    if multilabel:
        if strategy == "margin":
            return 1.0 - 2.0 * np.abs(p - 0.5).min(axis=1)
        q = np.clip(1.0 - p, 1e-12, 1.0)
        return -(p * np.log(p) + q * np.log(q)).sum(axis=1)
    if strategy == "margin":
        top2 = -np.sort(-p, axis=1)[:, :2]
        return 1.0 - (top2[:, 0] - (top2[:, 1] if p.shape[1] > 1 else 0.0))
    return -(p * np.log(p)).sum(axis=1)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = KMEANS_ITERS) -> np.ndarray:
    """[N] cluster of each row of x [N, F]: greedy k-means++ seeding from `rng` (scikit-learn's: of
    2 + log k candidates drawn by squared distance, the one that lowers the potential most), then
    Lloyd iterations. NumPy float32: on CPU its small products (a few centres against N rows) ran
    several times faster than torch's here."""
    xn = np.ascontiguousarray(x, dtype=np.float32)
    n = len(xn)
    k = min(k, n)
    sq = np.einsum("ij,ij->i", xn, xn)  # [N]

    def dist2(rows: np.ndarray) -> np.ndarray:  # [len(rows), N] squared distances to those rows
        return np.maximum(sq[None, :] - 2 * (xn[rows] @ xn.T) + sq[rows, None], 0)

    trials = 2 + int(np.log(max(k, 1)))
    first = int(rng.integers(n))
    centres = [first]
    d2 = dist2(np.array([first]))[0]  # [N] to the nearest centre so far
    for _ in range(1, k):
        w = d2.astype(np.float64)
        total = w.sum()
        cand = rng.choice(n, size=trials, p=w / total) if total > 0 else rng.integers(n, size=trials)
        pots = np.minimum(d2[None, :], dist2(cand))  # [trials, N]
        best = int(np.argmin(pots.sum(1)))
        centres.append(int(cand[best]))
        d2 = pots[best]
    cen = xn[centres].copy()  # [k, F]
    assign = np.zeros(n, dtype=np.int64)
    for it in range(iters):
        new = np.argmin(sq[:, None] - 2 * (xn @ cen.T) + np.einsum("ij,ij->i", cen, cen)[None, :], axis=1)  # [N]
        if it and np.array_equal(new, assign):
            break
        assign = new
        counts = np.bincount(assign, minlength=k)  # [k]
        sums = np.zeros_like(cen)
        np.add.at(sums, assign, xn)
        keep = counts > 0  # an emptied cluster keeps its old centre
        cen[keep] = sums[keep] / counts[keep, None]
    return assign


def _typicality(x: np.ndarray) -> np.ndarray:
    """[M] 1 / mean distance to the TYPICAL_NEIGHBOURS nearest other rows of x [M, F]."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if len(xt) < 2:
        return np.ones(len(xt))
    d = torch.cdist(xt, xt)  # [M, M]
    k = min(TYPICAL_NEIGHBOURS, len(xt) - 1)
    near = d.topk(k + 1, largest=False).values[:, 1:]  # [M, k] without the row itself
    return (1.0 / (near.mean(1) + 1e-8)).numpy()


def _typical(emb: np.ndarray, labelled: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """TypiClust: the most typical unlabelled image of each of the largest clusters without a label."""
    k = min(int(labelled.sum()) + n, len(emb))
    assign = kmeans(emb, k, rng)
    sizes = np.bincount(assign, minlength=k)
    covered = set(assign[labelled].tolist())
    order = sorted(range(k), key=lambda c: (c in covered, -sizes[c], c))  # uncovered first, largest first
    picks: list[int] = []
    for c in order:
        members = np.flatnonzero((assign == c) & ~labelled)
        if len(members):
            picks.append(int(members[int(np.argmax(_typicality(emb[assign == c])[~labelled[assign == c]]))]))
        if len(picks) == n:
            return picks
    rest = np.setdiff1d(np.flatnonzero(~labelled), picks)  # fewer non-empty clusters than n: fill at random
    return picks + [int(i) for i in rng.choice(rest, size=n - len(picks), replace=False)]


def _coreset(emb: np.ndarray, labelled: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """k-center greedy (Sener & Savarese): each pick is the image farthest from the labelled and picked ones."""
    xt = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    taken = labelled.copy()
    if taken.any():
        d = torch.cdist(xt, xt[torch.from_numpy(np.flatnonzero(taken))]).min(1).values  # [N]
        picks: list[int] = []
    else:
        first = int(rng.choice(np.flatnonzero(~taken)))
        picks = [first]
        taken[first] = True
        d = torch.cdist(xt, xt[first : first + 1])[:, 0]
    while len(picks) < n:
        d[torch.from_numpy(taken)] = -1.0
        i = int(d.argmax())
        picks.append(i)
        taken[i] = True
        d = torch.minimum(d, torch.cdist(xt, xt[i : i + 1])[:, 0])
    return picks


def _diverse_uncertain(emb: np.ndarray, free: np.ndarray, u: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """The n * CANDIDATES_PER_PICK most uncertain free images in n k-means clusters; the most uncertain
    of each cluster, most uncertain first."""
    cand = free[np.argsort(-u[free], kind="stable")[: n * CANDIDATES_PER_PICK]]
    assign = kmeans(emb[cand], n, rng)
    best: dict[int, int] = {}
    for row, c in zip(cand, assign):  # cand is most uncertain first: the first of a cluster is its best
        best.setdefault(int(c), int(row))
    picks = sorted(best.values(), key=lambda i: (-u[i], i))
    extra = [int(i) for i in cand if int(i) not in set(picks)]  # fewer clusters than n: the next most uncertain
    return (picks + extra)[:n]


# ---- the whole call -----------------------------------------------------------------------------
def suggest(
    pool: Dataset,
    n: int,
    strategy: str = "auto",
    *,
    method: Method | None = None,
    exclude: Collection[str] = (),
    seed: int = 1,
    ctx: RunContext | None = None,
    backbone: Backbone | None = None,
) -> list[Suggestion]:
    """The `n` pool images to label next, best first, none of them in `exclude` (names as `item_name`).

    method: a fitted model: its scores rank margin / entropy and give each row a guess; its training
    images count as labelled for `auto`. backbone: for the embeddings (default: the model's, else
    the offline default)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    if backbone is None:
        if method is not None:
            backbone = method.backbone
        else:
            from .backbones import create_backbone

            backbone = create_backbone("effnet-minilm")
    names = [item_name(it) for it in pool.items]
    done = set(exclude)
    labelled = np.array([nm in done for nm in names], dtype=bool)
    emb = pool_embeddings(backbone, pool, ctx)
    probs = model_scores(method, pool, ctx) if method is not None else None
    if strategy == "auto":
        learnt = method is not None and method.trains_on_images
        strategy = auto_strategy(len(done), len(method.classnames) if method else 0, learnt)
    if strategy in NEEDS_MODEL and method is None:
        raise ConfigError(f"strategy {strategy} ranks by a model's scores: give a model (--model)")
    picks = choose(emb, labelled, n, strategy, probs, seed, bool(method and method.multilabel))
    out = []
    for i in picks:
        guess = score = None
        if method is not None and probs is not None:
            c = int(np.argmax(probs[i]))
            guess, score = method.classnames[c], float(probs[i, c])
        out.append(Suggestion(i, names[i], strategy, guess, score))
    return out


def write_suggestions(path: str | os.PathLike, rows: list[Suggestion]) -> Path:
    """The suggestion CSV, written whole or not at all: image, then guess and score when a model gave them."""
    path = Path(path)
    with_model = any(r.guess is not None for r in rows)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "guess", "score", "strategy"] if with_model else ["image", "strategy"])
        for r in rows:
            extra: list[Any] = [r.guess, f"{r.score:.4f}"] if with_model else []
            w.writerow([r.image, *extra, r.strategy])
    return path


def suggest_to_csv(
    pool_spec: str,
    n: int,
    out: str | os.PathLike,
    *,
    model_dir: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
    strategy: str = "auto",
    seed: int = 1,
    ctx: RunContext | None = None,
    backbone: Backbone | None = None,
) -> list[Suggestion]:
    """`vlclassify suggest`: load the pool (and the model), drop what is labelled, write the CSV."""
    from .methods import load_method

    pool = load_pool(pool_spec)
    method = load_method(Path(model_dir)) if model_dir is not None else None
    done = labelled_in_csv(exclude) if exclude is not None else set()
    if model_dir is not None:
        done |= labelled_by_model(model_dir)
    rows = suggest(pool, n, strategy, method=method, exclude=done, seed=seed, ctx=ctx, backbone=backbone)
    write_suggestions(out, rows)
    return rows
