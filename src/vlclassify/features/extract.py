"""Batched feature extraction into the per-image store, with parallel decoding and a progress bar.

`extract_features(backbone, dataset)` returns a dataset's features row-aligned with its items:
rows already in the store (any dataset, split or earlier run with the same image) are read back,
only the missing images are decoded and encoded. `extract_to_store` is the streaming form behind
`vlclassify extract`: it takes inputs (e.g. WebDataset tars) one after another, writes shards as
they fill, and never holds a dataset's features in memory; a re-run skips what is stored.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, ImageOps

from ..backbones.base import Backbone, ImageFeatures
from ..data.decoder import decode
from ..data.items import Dataset, Item, PrecomputedFeatures
from ..errors import DataError
from .cache import FeatureCache
from .runtime import cpu_count, encoder_name, make_encoder, resolve_device, resolve_precision, resolve_runtime
from .store import FeatureStore, ShardWriter, text_key

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
        out = im.crop(box).resize((RRC_SIZE, RRC_SIZE), Image.Resampling.BICUBIC)
        return ImageOps.mirror(out) if rng.random() < 0.5 else out

    return view


VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "orig": lambda im: im,
    "flip": ImageOps.mirror,
    **{f"rrc{i}": random_resized_crop(i) for i in range(RRC_VIEWS)},  # Tip-Adapter's 10 augmented cache views
}
REDUCED_VIEWS = ("orig", "flip")  # decoded reduced towards the model's input; the random crops are drawn
# from the full-size image (their seed is its pixels), so they decode at full size as they always did
FP32_CPU_RUNTIMES = ("onnx", "torch")  # interchangeable to float rounding: "auto" accepts either's rows


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

    @classmethod
    def names_only(cls, n: int) -> FeatureSet:
        """`n` rows without features (0-wide): the training set of a method that fits from class names."""
        return cls(image=torch.zeros(n, 0), pooled=torch.zeros(n, 0))

    def vectors_per_row(self) -> int:
        """Feature vectors per row (1 per embedding, the tokens of the spatial grid): a problem's size."""
        return 1 + 1 + (0 if self.spatial is None else self.spatial.shape[1]) + (0 if self.text is None else 1)

    def has(self, key: str) -> bool:
        """Whether the field `key` was extracted."""
        return key in ("image", "pooled", "spatial", "text") and getattr(self, key) is not None

    def tensor(self, key: str) -> torch.Tensor:
        """One field; errors name a missing one."""
        x: torch.Tensor | None = getattr(self, key) if key in ("image", "pooled", "spatial", "text") else None
        if x is None:
            raise DataError(f"features: no {key!r} features were extracted")
        return x

    def batch(self, keys: Sequence[str], start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows start:stop of the fields `keys` as float32 (spatial tokens are stored as float16): a head's input."""
        return {k: self.tensor(k)[start:stop].float() for k in keys}

    def index(self, idx: Sequence[int] | np.ndarray) -> FeatureSet:
        """The rows at `idx` of every field and view, so a subset keeps its features."""
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, idx_t)

        return FeatureSet(
            image=self.image.index_select(0, idx_t),
            pooled=self.pooled.index_select(0, idx_t),
            spatial=pick(self.spatial),
            grid=self.grid,
            text=pick(self.text),
            views={k: v.index(idx) for k, v in self.views.items()},
        )


@dataclass
class Source:
    """One image to extract: its store key (content hash), how to decode it, its paired text."""

    key: str  # content hash (ImageSource.hash)
    load: Callable[[int | None], Image.Image]  # (model input side or None) -> RGB (data.decoder); errors name the image
    text: str | None = None  # caption / title, stored as a text row too


def item_source(item: Item) -> Source:
    """The Source of an item with an image (its content hash is the store key)."""
    if item.image is None:
        raise DataError(f"{item.key or '?'}: item has no image")
    return Source(item.image.hash(), lambda size: decode(item, size=size), item.text)


def image_space_key(backbone: Backbone, view: str, runtime: str) -> dict[str, Any]:
    """The identity of an image feature row: a changed weight file, preprocessing, view or runtime is another space."""
    return {
        "kind": "image",
        "backbone": backbone.identity(),
        "preprocess": backbone.preprocess_config(),
        "view": view,
        "runtime": runtime,
    }


def text_space_key(backbone: Backbone) -> dict[str, Any]:
    """The identity of a text feature row: the backbone (texts have no views or runtimes)."""
    return {"kind": "text", "backbone": backbone.identity()}


def _local_rank() -> int | None:
    r = os.environ.get("LOCAL_RANK")
    return int(r) if r is not None else None


@dataclass
class _Plan:
    """How images will be encoded, resolved without building the encoder."""

    device: torch.device
    precision: str
    chosen: str  # the encoder name rows will be stored under
    accepted: list[str]  # encoder names whose rows serve this request, preferred first


def _plan(backbone: Backbone, runtime: str, device: str, precision: str) -> _Plan:
    dev = resolve_device(device, _local_rank())
    prec = resolve_precision(dev, precision)
    rt = resolve_runtime(backbone, runtime, dev)
    if rt == "onnx" and prec not in ("fp32", "int8"):
        rt = "torch" if runtime == "auto" else rt  # make_encoder raises for an explicit onnx + fp16/bf16
    chosen = encoder_name(rt, dev, prec)
    # int8 rows are their own feature space: never served from, or mixed with, fp32 rows
    interchangeable = runtime == "auto" and prec != "int8"
    accepted = [chosen] + ([r for r in FP32_CPU_RUNTIMES if r != chosen] if interchangeable else [])
    return _Plan(dev, prec, chosen, accepted)


def _set_threads() -> None:
    n = cpu_count()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _decode(backbone: Backbone, src: Source, view: str, skip_bad: bool) -> torch.Tensor | None:
    try:
        return backbone.preprocess(VIEWS[view](src.load(backbone.image_size if view in REDUCED_VIEWS else None)))
    except DataError:
        if skip_bad:
            return None
        raise


def iter_batches(
    backbone: Backbone, sources: Iterable[Source], view: str, batch_size: int, workers: int, skip_bad: bool
) -> Iterator[tuple[list[Source], torch.Tensor | None, list[bool]]]:
    """Yield (sources, pixels [B_ok, 3, H, W] of the readable ones or None, ok flags) while the next batch decodes."""
    if view not in VIEWS:
        raise DataError(f"unknown view {view!r}; available: {', '.join(VIEWS)}")
    it = iter(sources)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def submit() -> tuple[list[Source], list[Future[torch.Tensor | None]]]:
            chunk = list(itertools.islice(it, batch_size))
            return chunk, [pool.submit(_decode, backbone, s, view, skip_bad) for s in chunk]

        pending = submit()
        while pending[0]:
            chunk, futures = pending
            tensors = [f.result() for f in futures]
            pending = submit()
            ok = [t is not None for t in tensors]
            good = [t for t in tensors if t is not None]
            yield chunk, (torch.stack(good) if good else None), ok


@torch.no_grad()
def _encode_sources(
    backbone: Backbone,
    encoder: Callable[..., ImageFeatures],
    sources: Iterable[Source],
    view: str,
    spatial: bool,
    batch_size: int,
    workers: int,
    skip_bad: bool,
    on_rows: Callable[[list[str], dict[str, np.ndarray], tuple[int, int] | None], None],
    bar: Any,  # a tqdm bar
) -> list[str]:
    """Decode and encode `sources`; hand each batch's rows to `on_rows(keys, arrays, grid)`. Returns the bad keys."""
    _set_threads()
    backbone.eval()
    bad: list[str] = []
    for chunk, pixels, ok in iter_batches(backbone, sources, view, batch_size, workers, skip_bad):
        bad += [s.key for s, o in zip(chunk, ok) if not o]
        if pixels is not None:
            out = encoder(pixels, spatial=spatial)  # inference mode inside; copied to numpy below
            arrays = {"image": out.embeds.float().numpy().copy(), "pooled": out.pooled.float().numpy().copy()}
            if spatial:
                arrays["spatial"] = out.tokens.half().numpy().copy()
            on_rows([s.key for s, o in zip(chunk, ok) if o], arrays, (out.grid[0], out.grid[1]) if spatial else None)
        if bar is not None:
            bar.update(len(chunk))
    return bad


def _item_keys(items: Sequence[Item], skip_bad: bool) -> list[str | None]:
    """Content hash per item; None for a text-only item or, with `skip_bad`, an unreadable file."""
    keys: list[str | None] = []
    for it in items:
        try:
            k = None if it.image is None else it.image.hash()
        except DataError:
            if not skip_bad:
                raise
            k = None
        if k is None and it.image is None and not skip_bad:
            raise DataError(f"{it.key or '?'}: item has no image (pass skip_bad=True to give it a zero row)")
        keys.append(k)
    return keys


def precomputed_feature_set(
    backbone: Backbone, dataset: Dataset, views: Sequence[str], spatial: bool, text: bool | None
) -> FeatureSet:
    """The FeatureSet of a dataset read from a feature file; what the file lacks is named."""
    pre = dataset.features
    assert pre is not None, "extract_features calls this for data read from a feature file"
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

    def to_set(p: PrecomputedFeatures) -> FeatureSet:
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
    device: str = "auto",
    precision: str = "auto",
    write: bool = True,
) -> FeatureSet:
    """Features of every item of `dataset` (first view first), reading stored rows and extracting the rest.

    A row is keyed by the image's content hash within its space (backbone identity with a weights
    fingerprint, preprocessing, view, runtime): any item whose image was extracted before, in any
    dataset, is read back, never recomputed. `text=None` encodes the items' texts when any item has
    one. `skip_bad` turns unreadable images into zero rows listed in `FeatureSet.skipped` instead of
    raising. `workers` decode threads (None: half the cores, at least one). `runtime` runs the
    image trunk in "torch", "onnx" (ONNX Runtime) or "auto" (onnx when importable on CPU);
    "auto" accepts rows made by either (they agree to float rounding). `device` auto|cpu|cuda[:i]
    (auto: CUDA when present) and `precision` auto|fp32|fp16|bf16|int8 (auto: bf16/fp16 autocast on
    a GPU, fp32 on CPU; int8: the quantised ONNX trunk, rows of their own); see features/runtime.py.
    `write=False` reads stored rows but keeps the new ones in memory only (predict and the service:
    a user's images do not fill their cache). Data read from a feature file (`dataset.features`,
    data/precomputed.py) is returned as it is: nothing is computed.
    """
    if dataset.features is not None:
        return precomputed_feature_set(backbone, dataset, views, spatial, text)
    cache = cache or FeatureCache()
    workers = workers or max(1, min(cpu_count() // 2, 8))
    plan = _plan(backbone, runtime, device, precision)
    items = dataset.items
    keys = _item_keys(items, skip_bad)
    n = len(items)
    store = cache.store if cache.enabled else None
    encoder = None
    sets: dict[str, FeatureSet] = {}
    for view in views:
        if view not in VIEWS:
            raise DataError(f"unknown view {view!r}; available: {', '.join(VIEWS)}")
        out = {
            "image": np.zeros((n, backbone.embed_dim), np.float32),
            "pooled": np.zeros((n, backbone.pooled_dim), np.float32),
        }
        fields = ["image", "pooled"] + (["spatial"] if spatial else [])
        have = np.zeros(n, dtype=bool)
        grid = None
        lookup_keys = [k or "" for k in keys]
        for rt in plan.accepted if store is not None else ():
            assert store is not None  # the loop runs only with a store
            sid = store.space(image_space_key(backbone, view, rt), create=False)
            if sid is None or have.all():
                continue
            rows = store.lookup(sid, lookup_keys, spatial)
            rows.row[have] = -1  # already read from a preferred runtime
            got, out = store.read(rows, fields, out)
            rows.row[~got] = -1  # rows of a shard dropped as damaged
            if got.any():
                grid = grid or store.grid(rows)
            have |= got
        todo: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k is not None and not have[i]:
                todo.setdefault(k, []).append(i)
        bad_keys: list[str] = []
        if todo:
            encoder = encoder or make_encoder(backbone, runtime, cache.root, plan.device, plan.precision)
            writer = (
                store.writer(
                    cast(str, store.space(image_space_key(backbone, view, encoder.name))),  # created: never None
                    shard_rows=cache.shard_rows,
                )
                if store is not None and write
                else None
            )

            def on_rows(
                ks: list[str],
                arrays: dict[str, np.ndarray],
                g: tuple[int, int] | None,
                writer: ShardWriter | None = writer,
                out: dict[str, np.ndarray] = out,
                todo: dict[str, list[int]] = todo,
            ) -> None:
                nonlocal grid
                grid = grid or g
                if writer is not None:
                    writer.add(ks, arrays, g)
                for f, a in arrays.items():
                    if f not in out:
                        out[f] = np.zeros((n, *a.shape[1:]), a.dtype)
                    pos = [todo[k] for k in ks]
                    rep = np.repeat(np.arange(len(ks)), [len(p) for p in pos])
                    out[f][np.concatenate(pos)] = a[rep]

            from tqdm.auto import tqdm

            desc = f"features {dataset.name or ''} [{view}]".strip()
            bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False)
            srcs = (item_source(items[todo[k][0]]) for k in todo)
            bad_keys = _encode_sources(
                backbone, encoder, srcs, view, spatial, batch_size, workers, skip_bad, on_rows, bar
            )
            bar.close()
            if writer is not None:
                writer.flush()
        if spatial and "spatial" not in out:  # nothing readable: shape the zeros like the backbone's tokens
            out["spatial"] = np.zeros((n, 0, backbone.embed_dim), np.float16)
        bad = set(bad_keys)
        skipped = [i for i, k in enumerate(keys) if k is None or k in bad]
        sets[view] = FeatureSet(
            image=torch.from_numpy(out["image"]),
            pooled=torch.from_numpy(out["pooled"]),
            spatial=torch.from_numpy(out["spatial"]) if spatial else None,
            grid=(grid or (0, 0)) if spatial else None,
            skipped=skipped,
        )
    first = sets[views[0]]
    first.views = {v: s for v, s in sets.items() if v != views[0]}
    if text is None:
        text = any(it.text for it in items)
    if text:
        first.text = encode_texts(backbone, dataset.texts(), cache, write=write)
    return first


def extract_to_store(
    backbone: Backbone,
    inputs: Iterable[tuple[str | None, Iterable[Source]]],
    views: Sequence[str] = ("orig",),
    spatial: bool = False,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    runtime: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    writer_name: str | None = None,
    text: bool = True,
) -> dict[str, Any]:
    """Stream `inputs` — (signature or None, sources) pairs, e.g. one per WebDataset tar — into the store.

    Images already stored (any accepted runtime) are skipped before decoding; an input whose
    signature a committed shard recorded as done is skipped without reading it. Shards of
    `cache.shard_rows` rows are committed as they fill, and an input is marked done once all its
    rows are committed: a killed run loses at most the shard in progress. With `text`, the
    sources' paired texts are stored as text rows too. Returns counts.
    """
    cache = cache or FeatureCache()
    if not cache.enabled:
        raise DataError("extract_to_store needs an enabled feature cache")
    workers = workers or max(1, min(cpu_count() // 2, 8))
    plan = _plan(backbone, runtime, device, precision)
    store = cache.store
    inputs = list(inputs)  # (signature, lazy sources): listing the inputs reads none of them
    encoder = None
    stats = {"inputs": len(inputs), "inputs_skipped": 0, "seen": 0, "computed": 0, "bad": 0, "shards": 0, "texts": 0}
    from tqdm.auto import tqdm

    for view in views:
        if view not in VIEWS:
            raise DataError(f"unknown view {view!r}; available: {', '.join(VIEWS)}")
        spaces = [
            s for s in (store.space(image_space_key(backbone, view, r), create=False) for r in plan.accepted) if s
        ]
        done = (
            set().union(*(store.input_done(s, [sig for sig, _ in inputs if sig]) for s in spaces)) if spaces else set()
        )
        writer: ShardWriter | None = None
        bar = tqdm(desc=f"extract [{view}]", unit="img", disable=not progress)
        written: set[str] = set()
        for sig, sources in inputs:
            if sig is not None and sig in done:
                stats["inputs_skipped"] += 1
                continue
            if encoder is None:
                encoder = make_encoder(backbone, runtime, cache.root, plan.device, plan.precision)
            if writer is None:
                sid = cast(str, store.space(image_space_key(backbone, view, encoder.name)))  # created: never None
                spaces = list(dict.fromkeys([sid, *spaces]))
                writer = store.writer(sid, name=writer_name and f"{writer_name}-{view}", shard_rows=cache.shard_rows)
            texts: list[str] = []
            todo = _missing(
                store, spaces, sources, spatial, written, stats, bar, texts if text and view == views[0] else None
            )

            bad = _encode_sources(
                backbone, encoder, todo, view, spatial, batch_size, workers, skip_bad, writer.add, None
            )
            stats["bad"] += len(bad)
            if texts:
                stats["texts"] += len(encode_texts(backbone, texts, cache))
            if sig is not None:
                writer.flush(inputs=[sig])
        if writer is not None:
            writer.flush()
            stats["computed"] += writer.written
            stats["shards"] += len(writer.shards)
        bar.close()
    return stats


def _missing(
    store: FeatureStore,
    spaces: list[str],
    sources: Iterable[Source],
    spatial: bool,
    written: set[str],
    stats: dict[str, Any],
    bar: Any,  # a tqdm bar
    texts: list[str] | None,
    chunk: int = 256,
) -> Iterator[Source]:
    """The sources whose key no accepted space holds yet (checked in chunks, before any decoding);
    the texts of all of them go to `texts`."""
    it = iter(sources)
    while chunk_ := list(itertools.islice(it, chunk)):
        stats["seen"] += len(chunk_)
        bar.update(len(chunk_))
        if texts is not None:
            texts += [s.text for s in chunk_ if s.text]
        have = np.zeros(len(chunk_), dtype=bool)
        for sid in spaces:
            have |= store.lookup(sid, [s.key for s in chunk_], spatial).found
        for s, h in zip(chunk_, have):
            if not h and s.key not in written:
                written.add(s.key)
                yield s


@torch.no_grad()
def encode_texts(
    backbone: Backbone,
    texts: Sequence[str],
    cache: FeatureCache | None = None,
    batch_size: int = 128,
    write: bool = True,
) -> torch.Tensor:
    """[N, D] L2-normalised text embeddings (empty texts give zero rows), one store row per distinct text;
    `write=False` reads stored rows but adds none."""
    cache = cache or FeatureCache()
    n = len(texts)
    emb = np.zeros((n, backbone.embed_dim), np.float32)
    keys = [text_key(t) if t else "" for t in texts]
    have = np.array([not t for t in texts], dtype=bool)
    store = cache.store if cache.enabled else None
    sid = store.space(text_space_key(backbone), create=write) if store is not None and any(texts) else None
    if store is not None and sid is not None:
        got, out = store.read(store.lookup(sid, keys), ["text"], {"text": emb})
        emb = out["text"]
        have |= got
    todo: dict[str, list[int]] = {}
    for i in np.flatnonzero(~have):
        todo.setdefault(keys[i], []).append(int(i))
    if todo:
        uniq = list(todo)
        vecs = backbone.encode_texts_normalized([texts[todo[k][0]] for k in uniq], batch_size).float().numpy()
        for k, v in zip(uniq, vecs):
            emb[todo[k]] = v
        if store is not None and sid is not None:
            w = store.writer(sid, shard_rows=cache.shard_rows)
            w.add(uniq, {"text": vecs})
            w.flush()
    return torch.from_numpy(emb)
