"""Training rows read from the feature store batch by batch: a training set larger than memory.

`stored_rows` makes sure every image of a dataset is in the store (extracting only what is not,
straight into store shards, never as one in-memory tensor) and locates its rows once; the
Trainer's batches then gather only their own rows from the memory-mapped shards. A `RowBatch`
is read by `shard(rank, world)`, so under torchrun each process pages in only its share of each
global batch. Batches hold the same rows in the same order as `Method.feature_batches` over
in-memory tensors (one fresh permutation per epoch, views stacked view after view), so a
streamed fit takes the same optimizer steps as an in-memory one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..backbones.base import Backbone
from ..data.items import Dataset
from ..errors import ConfigError, DataError
from .cache import FeatureCache
from .extract import _item_keys, _plan, extract_to_store, image_space_key, item_source
from .protocol import Features
from .store import FeatureStore, Rows

IMAGE_FIELDS = ("image", "pooled", "spatial")


class StoredRows:
    """A dataset's training rows (every view, view after view) located in the store, with their targets."""

    def __init__(
        self,
        store: FeatureStore,
        views: list[list[Rows]],
        fields: Sequence[str],
        targets: torch.Tensor,
        grid: tuple[int, int] | None,
    ) -> None:
        self.store = store
        self.views = views  # per view: the Rows of each accepted runtime's space (-1 where another has it)
        self.fields = list(fields)
        self.n = len(views[0][0])  # items per view
        self.targets = targets.repeat(len(views), *([1] * (targets.dim() - 1)))  # [V * N] or [V * N, C]
        self.grid = grid

    def __len__(self) -> int:
        return self.n * len(self.views)

    def read(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows `idx` (indices into the stacked views) as float32 tensors, plus their targets."""
        idx = np.asarray(idx, dtype=np.int64)
        out: dict[str, np.ndarray] = {}
        got = np.zeros(len(idx), dtype=bool)
        for v, located in enumerate(self.views):
            sel = np.flatnonzero(idx // self.n == v)
            if not len(sel):
                continue
            part: dict[str, np.ndarray] = {}
            have = np.zeros(len(sel), dtype=bool)
            for rows in located:
                r = idx[sel] % self.n
                ok, part = self.store.read(Rows(rows.space, rows.shard[r], rows.row[r]), self.fields, part)
                have |= ok
            got[sel] = have
            for f, a in part.items():
                if f not in out:
                    out[f] = np.zeros((len(idx), *a.shape[1:]), a.dtype)
                out[f][sel] = a
        if not got.all():
            raise DataError(
                f"feature store: {int((~got).sum())} training row(s) vanished from the store while training "
                "(a damaged or pruned shard); re-run the fit to recompute them"
            )
        batch = {f: torch.from_numpy(out[f]).float() for f in self.fields}
        batch["targets"] = self.targets[torch.from_numpy(idx)]
        return batch

    def batches(self) -> Callable[[Any, int, int], list[RowBatch]]:
        """The Trainer's batches: a fresh permutation of the rows every epoch, cut into global batches."""
        n = len(self)

        def make(stage: Any, epoch: int, seed: int) -> list[RowBatch]:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
            bs = min(stage.batch_size, n)
            return [RowBatch(self, order[i : i + bs]) for i in range(0, n, bs)]

        return make


class RowBatch:
    """One global batch, as row indices: reading it (`shard`) pages in only the rows a process trains on."""

    def __init__(self, rows: StoredRows, idx: np.ndarray) -> None:
        self.rows, self.idx = rows, idx

    def __len__(self) -> int:
        return len(self.idx)

    def shard(self, rank: int, world: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the batch (every world-th from `rank`), read from the store only now."""
        if len(self.idx) < world:
            raise ConfigError(f"trainer: a batch of {len(self.idx)} row(s) cannot be shared by {world} processes")
        return self.rows.read(self.idx[rank::world])


class StreamedFeatures:
    """The `features` of a streamed training set: its rows stay in the store and reach the Trainer
    through `StoredRows` batches, so whole tensors are never built (a method declares `tags.stream`
    when it trains on batches alone)."""

    def __init__(self, n: int, grid: tuple[int, int] | None, method: str, fields: Sequence[str] = ()) -> None:
        self.n, self.grid, self.method, self.fields = n, grid, method, list(fields)
        self.views: dict[str, Features] = {}
        self.skipped: list[int] = []

    def __len__(self) -> int:
        return self.n

    def has(self, key: str) -> bool:
        """Whether `key` is streamed (its rows are in the store)."""
        return key in self.fields

    def _refuse(self, what: str) -> ConfigError:
        return ConfigError(
            f"method {self.method!r} reads whole training feature tensors ({what}), so it cannot train "
            "streamed from the feature store; fit it without streaming"
        )

    def tensor(self, key: str) -> torch.Tensor:
        """Refused: no whole tensor is built."""
        raise self._refuse(key)

    def batch(self, keys: Sequence[str], start: int, stop: int) -> dict[str, torch.Tensor]:
        """Refused: streamed rows come in the Trainer's batches."""
        raise self._refuse(", ".join(keys))

    def index(self, idx: Sequence[int] | np.ndarray) -> StreamedFeatures:
        """Refused: a streamed set is not subset in memory."""
        raise self._refuse("a subset")

    def vectors_per_row(self) -> int:
        """Feature vectors per row of the streamed fields (the spatial grid's tokens count each)."""
        h, w = self.grid or (1, 1)
        return sum(h * w if f == "spatial" else 1 for f in self.fields) or 1


def stored_rows(
    backbone: Backbone,
    dataset: Dataset,
    views: Sequence[str],
    fields: Sequence[str],
    targets: torch.Tensor,
    cache: FeatureCache,
    runtime: str = "auto",
    progress: bool = True,
) -> StoredRows:
    """Store what is missing of `dataset` (every view), then locate its rows of `fields` (image fields only)."""
    bad = [f for f in fields if f not in IMAGE_FIELDS]
    if bad:
        raise ConfigError(f"streamed training reads image features from the store; not {', '.join(bad)}")
    if not cache.enabled:
        raise ConfigError("streamed training needs the feature cache (it reads training rows from the store)")
    spatial = "spatial" in fields
    sources = [item_source(it) for it in dataset.items]  # read once per view
    extract_to_store(backbone, [(None, sources)], views, spatial, cache, progress=progress, runtime=runtime, text=False)
    keys = [k or "" for k in _item_keys(dataset.items, skip_bad=False)]
    store, accepted = cache.store, _plan(backbone, runtime, "auto", "auto").accepted
    located: list[list[Rows]] = []
    grid = None
    for view in views:
        have = np.zeros(len(keys), dtype=bool)
        per_space = []
        for rt in accepted:
            sid = store.space(image_space_key(backbone, view, rt), create=False)
            if sid is None:
                continue
            rows = store.lookup(sid, keys, spatial)
            rows.row[have] = -1  # already located in a preferred runtime's space
            rows.shard[have] = ""
            have |= rows.found
            per_space.append(rows)
            grid = grid or (store.grid(rows) if spatial else None)
        if not have.all():
            first = dataset.items[int(np.flatnonzero(~have)[0])]
            raise DataError(f"{dataset.name}: image {first.origin or first.key} is not in the feature store")
        located.append(per_space)
    return StoredRows(store, located, fields, targets, grid)
