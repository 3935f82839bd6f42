"""Batched feature extraction with parallel image decoding, a progress bar and the cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

from ..backbones.base import Backbone
from ..data.images import load_image
from ..data.items import Dataset, Item
from ..errors import DataError
from .cache import FeatureCache
from .runtime import cpu_count, make_encoder, resolve_runtime

RRC_VIEWS, RRC_SIZE, RRC_SCALE, RRC_RATIO = 10, 224, (0.5, 1.0), (3 / 4, 4 / 3)  # Tip-Adapter's augmentation


def random_resized_crop(index: int) -> Callable[[Image.Image], Image.Image]:
    """View `rrc<index>`: a random-resized crop (area RRC_SCALE of the image, aspect RRC_RATIO,
    torchvision's RandomResizedCrop draw) resized to RRC_SIZE² with bicubic, then a horizontal flip
    with probability 1/2 (Tip-Adapter's training augmentation). The draw is seeded by the view index
    and the image's pixels, so a view of an image is the same in every run and on every machine."""

    def view(im: Image.Image) -> Image.Image:
        import hashlib
        import math
        import random

        digest = hashlib.sha256(f"rrc{index}/{im.mode}/{im.size}".encode() + im.tobytes()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        w, h = im.size
        area, log_ratio = w * h, (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
        box = None
        for _ in range(10):
            target = area * rng.uniform(*RRC_SCALE)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
                box = (left, top, left + cw, top + ch)
                break
        if box is None:  # torchvision's fallback: the central crop within the aspect bounds
            if w / h < RRC_RATIO[0]:
                cw, ch = w, round(w / RRC_RATIO[0])
            elif w / h > RRC_RATIO[1]:
                cw, ch = round(h * RRC_RATIO[1]), h
            else:
                cw, ch = w, h
            left, top = (w - cw) // 2, (h - ch) // 2
            box = (left, top, left + cw, top + ch)
        out = im.crop(box).resize((RRC_SIZE, RRC_SIZE), Image.BICUBIC)
        return ImageOps.mirror(out) if rng.random() < 0.5 else out

    return view


VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "orig": lambda im: im,
    "flip": ImageOps.mirror,
    **{f"rrc{i}": random_resized_crop(i) for i in range(RRC_VIEWS)},  # Tip-Adapter's 10 augmented cache views
}


@dataclass
class FeatureSet:
    """Cached features of a dataset, row-aligned with its items."""

    image: torch.Tensor  # [N, D] global image embeddings (joint space, not normalised)
    pooled: torch.Tensor  # [N, F] raw pooled visual features
    spatial: torch.Tensor | None = None  # [N, P, D] spatial tokens (float16 on disk)
    grid: tuple[int, int] | None = None  # (h, w) of the spatial tokens
    text: torch.Tensor | None = None  # [N, D] embeddings of the items' paired texts
    views: dict[str, FeatureSet] = field(default_factory=dict)  # augmentation views, e.g. "flip"
    skipped: list[int] = field(default_factory=list)  # indices of unreadable images (skip_bad=True)

    def __len__(self) -> int:
        return self.image.shape[0]

    def tensor(self, key: str) -> torch.Tensor:
        """One field; errors name a missing one."""
        x = getattr(self, key)
        if x is None:
            raise DataError(f"features: no {key!r} features were extracted")
        return x

    def batch(self, keys: Sequence[str], start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows start:stop of the fields `keys` as float32 (spatial tokens are stored as float16): a head's input."""
        return {k: self.tensor(k)[start:stop].float() for k in keys}

    def index(self, idx: Sequence[int] | np.ndarray) -> FeatureSet:
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        pick = lambda t: None if t is None else t.index_select(0, idx_t)  # noqa: E731
        return FeatureSet(
            image=pick(self.image),
            pooled=pick(self.pooled),
            spatial=pick(self.spatial),
            grid=self.grid,
            text=pick(self.text),
            views={k: v.index(idx) for k, v in self.views.items()},
        )


def _set_threads() -> None:
    n = cpu_count()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _decode(backbone: Backbone, item: Item, view: str, skip_bad: bool) -> torch.Tensor | None:
    try:
        return backbone.preprocess(VIEWS[view](load_image(item)))
    except DataError:
        if skip_bad:
            return None
        raise


def iter_batches(
    backbone: Backbone, items: Sequence[Item], view: str, batch_size: int, workers: int, skip_bad: bool
) -> Iterator[tuple[int, torch.Tensor, list[int]]]:
    """Yield (start, pixels [B, 3, H, W], bad offsets) while the next batch decodes in threads."""
    if view not in VIEWS:
        raise DataError(f"unknown view {view!r}; available: {', '.join(VIEWS)}")
    starts = list(range(0, len(items), batch_size))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def submit(s: int):
            return [pool.submit(_decode, backbone, it, view, skip_bad) for it in items[s : s + batch_size]]

        pending = submit(starts[0]) if starts else None
        for j, s in enumerate(starts):
            tensors = [f.result() for f in pending]
            pending = submit(starts[j + 1]) if j + 1 < len(starts) else None
            bad = [i for i, t in enumerate(tensors) if t is None]
            good = [t for t in tensors if t is not None]
            if bad and good:
                fill = torch.zeros_like(good[0])
                tensors = [fill if t is None else t for t in tensors]
            elif not good:
                tensors = [torch.zeros(3, backbone.image_size, backbone.image_size)] * len(tensors)
            yield s, torch.stack(tensors), bad


@torch.no_grad()
def _compute(
    backbone: Backbone,
    encoder: Callable,
    items: Sequence[Item],
    view: str,
    spatial: bool,
    batch_size: int,
    workers: int,
    progress: bool,
    skip_bad: bool,
    desc: str,
) -> dict[str, torch.Tensor]:
    """Run `encoder` (see runtime.make_encoder) over decoded batches while the next batch decodes."""
    from tqdm.auto import tqdm

    _set_threads()
    backbone.eval()
    n = len(items)
    img = torch.zeros(n, backbone.embed_dim)
    pooled = torch.zeros(n, backbone.pooled_dim)
    sp = None
    grid = (0, 0)
    bad_all: list[int] = []
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    for s, pixels, bad in iter_batches(backbone, items, view, batch_size, workers, skip_bad):
        out = encoder(pixels, spatial=spatial)  # inference mode inside; copied into normal tensors below
        b = pixels.shape[0]
        img[s : s + b] = out.embeds.float()
        pooled[s : s + b] = out.pooled.float()
        if spatial:
            if sp is None:
                sp = torch.zeros(n, out.tokens.shape[1], out.tokens.shape[2], dtype=torch.float16)
                grid = out.grid
            sp[s : s + b] = out.tokens.half()
        bad_all += [s + i for i in bad]
        bar.update(b)
    bar.close()
    out_t = {"image": img, "pooled": pooled, "skipped": torch.tensor(bad_all, dtype=torch.int64)}
    if spatial:
        out_t["spatial"] = sp if sp is not None else torch.zeros(0, 0, backbone.embed_dim, dtype=torch.float16)
        out_t["grid"] = torch.tensor(grid, dtype=torch.int64)
    return out_t


@torch.no_grad()
def encode_texts(
    backbone: Backbone, texts: Sequence[str], cache: FeatureCache | None = None, batch_size: int = 128
) -> torch.Tensor:
    """[N, D] L2-normalised text embeddings (empty texts give zero rows), cached."""
    from ..utils import json_fingerprint

    cache = cache or FeatureCache()
    key = {"kind": "text", "backbone": backbone.identity(), "texts": json_fingerprint(list(texts))}
    hit = cache.load(key, ["text"])
    if hit is not None:
        return hit["text"]
    nonempty = [i for i, t in enumerate(texts) if t]
    emb = torch.zeros(len(texts), backbone.embed_dim)
    if nonempty:
        emb[nonempty] = backbone.encode_texts_normalized([texts[i] for i in nonempty], batch_size)
    cache.save(key, {"text": emb})
    return emb


def _runtime_key(base_key: dict, runtime: str) -> dict:
    """torch keeps the original key (existing cache entries stay valid); others add their name."""
    return base_key if runtime == "torch" else {**base_key, "runtime": runtime}


def precomputed_feature_set(
    backbone: Backbone, dataset: Dataset, views: Sequence[str], spatial: bool, text: bool | None
) -> FeatureSet:
    """The FeatureSet of a dataset read from a feature file; what the file lacks is named."""
    pre = dataset.features
    if pre.image.shape[1] != backbone.embed_dim:
        raise DataError(
            f"{pre.path}: image embeddings are {pre.image.shape[1]}-d but backbone {backbone.name!r} has a "
            f"{backbone.embed_dim}-d joint space; pass the backbone the features came from (--backbone)"
        )
    if text:
        raise DataError(f"{pre.path}: this method needs the items' paired texts; a feature file has none")
    sources = {"orig": pre, **pre.views}
    missing = [v for v in views if v not in sources]
    if missing:
        raise DataError(
            f"{pre.path}: this method trains on view(s) {', '.join(views)}; the file has no "
            + ", ".join(f"{v!r} ('{v}.image')" for v in missing)
        )
    lacking = [v for v in views if spatial and sources[v].spatial is None]
    if lacking:
        raise DataError(
            f"{pre.path}: this method needs spatial tokens of view(s) {', '.join(lacking)}; the file has none"
        )

    def to_set(p) -> FeatureSet:
        return FeatureSet(
            image=p.image,
            pooled=p.image if p.pooled is None else p.pooled,  # without pooled features the embeddings stand in
            spatial=p.spatial if spatial else None,
            grid=p.grid if spatial else None,
        )

    first = to_set(sources[views[0]])
    first.views = {v: to_set(sources[v]) for v in views[1:]}
    return first


def extract_features(
    backbone: Backbone,
    dataset: Dataset,
    views: Sequence[str] = ("orig",),
    spatial: bool = False,
    text: bool | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    runtime: str = "auto",
) -> FeatureSet:
    """Features of every item of `dataset` (first view first), from the cache when the key matches.

    `text=None` encodes the items' texts when any item has one. `skip_bad` turns unreadable
    images into zero rows listed in `FeatureSet.skipped` instead of raising. `workers` decode
    threads (None: half the cores, at least one; decoding is a small share of the work and more
    threads only contend with the model on a busy CPU, see docs/benchmarks.md). `runtime` runs the
    image trunk in "torch", "onnx" (ONNX Runtime) or "auto" (onnx when importable); see
    features/runtime.py. Non-torch runtimes are part of the cache key (their floats differ in
    the last bits); "auto" accepts an entry made by either runtime. Data read from a feature
    file (`dataset.features`, data/precomputed.py) is returned as it is: nothing is computed.
    """
    if dataset.features is not None:
        return precomputed_feature_set(backbone, dataset, views, spatial, text)
    cache = cache or FeatureCache()
    workers = workers or max(1, min(cpu_count() // 2, 8))
    chosen = resolve_runtime(backbone, runtime)
    accepted = [chosen] + ([r for r in ("onnx", "torch") if r != chosen] if runtime == "auto" else [])
    encoder = None
    base_key = {
        "kind": "image",
        "backbone": backbone.identity(),
        "dataset": dataset.fingerprint(),
        "preprocess": backbone.preprocess_config(),
        "skip_bad": skip_bad,
    }
    sets: dict[str, FeatureSet] = {}
    for view in views:
        names = ["image", "pooled", "skipped"] + (["spatial", "grid"] if spatial else [])
        got = None
        for rt in accepted:
            for sp in (True,) if spatial else (False, True):  # a spatial entry also serves plain requests
                got = cache.load({**_runtime_key(base_key, rt), "view": view, "spatial": sp}, names)
                if got is not None:
                    break
            if got is not None:
                break
        if got is None:
            encoder = encoder or make_encoder(backbone, runtime, cache.root)
            got = _compute(
                backbone,
                encoder,
                dataset.items,
                view,
                spatial,
                batch_size,
                workers,
                progress,
                skip_bad,
                desc=f"features {dataset.name or ''} [{view}]".strip(),
            )
            cache.save({**_runtime_key(base_key, encoder.name), "view": view, "spatial": spatial}, got)
        sets[view] = FeatureSet(
            image=got["image"],
            pooled=got["pooled"],
            spatial=got.get("spatial"),
            grid=tuple(got["grid"].tolist()) if "grid" in got else None,
            skipped=got["skipped"].tolist(),
        )
    first = sets[views[0]]
    first.views = {v: s for v, s in sets.items() if v != views[0]}
    if text is None:
        text = any(it.text for it in dataset.items)
    if text:
        first.text = encode_texts(backbone, dataset.texts(), cache)
    return first
