"""Extraction across processes and machines: `torchrun ... -m vlclassify extract --data SPEC`.

Every rank takes every `world_size`-th input — a WebDataset tar, or a block of `shard_rows` items
of any other data — and writes its own store shards; ranks other than 0 never touch the index.
Rank 0 merges what a killed run left (its committed shards) before the others start, and every
rank's shards when all are done. A run killed at any moment loses at most each rank's shard in
progress: a re-run skips finished tars without reading them and stored images before decoding.
Without torchrun it is the same code with one rank. See docs/scaling.md for the multi-node recipe.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from PIL import Image

from ..backbones.base import Backbone
from ..data import webdataset
from ..data.items import Item
from ..data.source import BytesSource
from ..data.spec import load_data, parse_spec
from ..errors import ConfigError, DataError
from .cache import FeatureCache
from .extract import VIEWS, Source, _plan, extract_to_store, image_space_key, item_source, text_space_key


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        """Whether more than one rank runs (torchrun)."""
        return self.world_size > 1


def dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE."""
    env = os.environ if environ is None else environ
    try:
        return DistEnv(
            int(env.get("RANK", 0)),
            int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)),
        )
    except ValueError as e:
        raise ConfigError(f"torchrun environment: {e}") from None


class _Group:
    """A gloo process group for barriers and the final counts (extraction moves no tensors between ranks)."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        if env.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                hours = float(os.environ.get("VLCLASSIFY_DIST_TIMEOUT_HOURS", "24"))
                dist.init_process_group("gloo", timeout=timedelta(hours=hours))

    def barrier(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, stats: dict) -> dict:
        if not self.env.distributed:
            return stats
        import torch.distributed as dist

        parts: list = [None] * self.env.world_size
        dist.all_gather_object(parts, stats)
        return {k: sum(p[k] for p in parts) for k in stats}

    def close(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _tar_sources(tar: str, text: str) -> Iterator[Source]:
    for where, data, caption in webdataset.iter_samples(tar, text):
        if data is None:
            err = DataError(f"{where}: sample has no image member ({', '.join(webdataset.IMAGE_EXTS)})")
            yield Source(f"unreadable:{where}", _raiser(err), caption)
        else:
            yield item_source(Item(image=BytesSource(data, where), text=caption))


def _raiser(err: DataError) -> Callable[[int | None], Image.Image]:
    def load(size: int | None) -> Image.Image:
        raise err

    return load


def _item_sources(items: Sequence[Item], skip_bad: bool) -> Iterator[Source]:
    """Sources of items; an unhashable one (missing file, no image) fails at decode, so skip_bad counts it."""
    for it in items:
        try:
            if it.image is None:
                raise DataError(f"{it.key or '?'}: item has no image")
            yield item_source(it)
        except DataError as e:
            if not skip_bad:
                raise
            yield Source(f"unreadable:{it.key}", _raiser(e), it.text)


def plan_inputs(
    spec: str, split: str | None, shard_rows: int, env: DistEnv, skip_bad: bool = False
) -> tuple[list[tuple[str | None, Iterator[Source]]], dict[str, int]]:
    """This rank's inputs and the item counts per split (WebDataset tars: {"all": tars})."""
    base, opts = parse_spec(spec)
    if webdataset.is_webdataset(base) and split is None:
        tars = webdataset.expand_shards(base)
        mine = tars[env.rank :: env.world_size]
        text = opts.get("text", "txt")
        return [(webdataset.shard_signature(t), _tar_sources(t, text)) for t in mine], {"tars": len(tars)}
    splits = load_data(spec)
    if split is not None:
        if split not in splits:
            raise DataError(f"{spec}: no {split!r} split (have: {', '.join(splits)})")
        splits = {split: splits[split]}
    items = [it for ds in splits.values() for it in ds.items]
    blocks = [items[s : s + shard_rows] for s in range(0, len(items), shard_rows)]
    my_blocks = blocks[env.rank :: env.world_size]
    return [(None, _item_sources(b, skip_bad)) for b in my_blocks], {k: len(v) for k, v in splits.items()}


def extract_spec(
    backbone: Backbone,
    spec: str,
    split: str | None = None,
    views: Sequence[str] = ("orig",),
    spatial: bool = False,
    cache: FeatureCache | None = None,
    skip_bad: bool = False,
    runtime: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    progress: bool = True,
    env: DistEnv | None = None,
) -> dict:
    """Extract every image of `spec` (one split, or all) into the store, across torchrun's ranks.

    Returns the counts summed over ranks: seen, computed, bad, shards, inputs, inputs_skipped,
    plus `sizes` (items per split, or the number of tars)."""
    env = env or dist_env()
    cache = cache or FeatureCache()
    for v in views:
        if v not in VIEWS:
            raise DataError(f"unknown view {v!r}; available: {', '.join(VIEWS)}")
    cache = FeatureCache(cache.root, shard_rows=cache.shard_rows, read_only=env.rank != 0)
    group = _Group(env)
    try:
        plan = _plan(backbone, runtime, device, precision)
        keys = [image_space_key(backbone, v, rt) for v in views for rt in plan.accepted] + [text_space_key(backbone)]
        if env.rank == 0:  # index what a killed run committed, so every rank skips it
            for k in keys:
                cache.store.space(k, create=False)
        group.barrier()
        inputs, sizes = plan_inputs(spec, split, cache.shard_rows, env, skip_bad)
        writer = f"r{env.rank:04d}of{env.world_size:04d}-{os.getpid()}-{np.random.default_rng().integers(1 << 24):06x}"
        stats = extract_to_store(
            backbone,
            inputs,
            views=views,
            spatial=spatial,
            cache=cache,
            batch_size=batch_size,
            progress=progress and env.rank == 0,
            skip_bad=skip_bad,
            runtime=runtime,
            device=device,
            precision=precision,
            writer_name=writer if env.distributed else None,
        )
        cache.store.close()
        group.barrier()
        if env.rank == 0:  # merge every rank's shards into the index
            for k in keys:
                cache.store.space(k, create=False)
        stats = group.sum(stats)
    finally:
        group.close()
    stats["sizes"] = sizes
    return stats
