"""The feature cache: extract once, reuse across methods and runs.

Image features and text embeddings live in the per-image store (`cache.store`, features/store.py):
one row per image content hash, shared by every dataset, split and run. Per-dataset activations
that are not per-image rows (CMA-CLIP's trunk activations, features/trunk.py) stay entries:
a folder `<cache>/features/<key-hash>/` with `features.safetensors` and `meta.json` holding the
full key. Entries are written atomically; on load the stored key must equal the requested one, so
a mismatch (or a damaged entry) is recomputed, never silently reused.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import atomic_path, default_cache_dir, json_fingerprint
from .store import FeatureStore

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: image features and texts moved to the per-image store; v1 entries are ignored


class FeatureCache:
    """`enabled=False` computes everything and keeps nothing. `shard_rows`: rows per store shard
    (the resume granularity of a long extraction). `read_only`: never write the store's index
    (the non-zero ranks of a distributed run; rank 0 merges their shards)."""

    def __init__(
        self, root: str | Path | None = None, enabled: bool = True, shard_rows: int = 1024, read_only: bool = False
    ) -> None:
        self.root = Path(root) if root else default_cache_dir()
        self.enabled = enabled
        self.shard_rows = shard_rows
        self.read_only = read_only
        self._store: FeatureStore | None = None

    @property
    def store(self) -> FeatureStore:
        """The per-image feature store under the cache root, opened on first use."""
        if self._store is None:
            self._store = FeatureStore(self.root / "store", read_only=self.read_only)
        return self._store

    def _dir(self, key: dict[str, Any]) -> Path:
        return self.root / "features" / json_fingerprint({**key, "cache_version": CACHE_VERSION})

    def load(self, key: dict[str, Any], names: list[str]) -> dict[str, torch.Tensor] | None:
        """The tensors `names` of the entry for `key`, or None if absent, mismatched or damaged."""
        if not self.enabled:
            return None
        d = self._dir(key)
        meta_p, data_p = d / "meta.json", d / "features.safetensors"
        if not (meta_p.exists() and data_p.exists()):
            return None
        try:
            meta = json.loads(meta_p.read_text())
            if meta.get("key") != json.loads(json.dumps(key, default=str)):
                log.warning("feature cache: key mismatch in %s; recomputing", d)
                return None
            with safe_open(str(data_p), framework="pt") as f:
                if not set(names) <= set(f.keys()):
                    return None
                return {n: f.get_tensor(n) for n in names}
        except Exception as e:  # damaged entry: recompute rather than trust it
            log.warning("feature cache: cannot read %s (%s); recomputing", d, e)
            return None

    def save(self, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path | None:
        """Save tensors under `key` atomically; None when the cache is disabled or cannot be written."""
        if not self.enabled:
            return None
        d = self._dir(key)
        try:
            with atomic_path(d, is_dir=True) as tmp:
                tmp.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "features.safetensors"))
                (tmp / "meta.json").write_text(
                    json.dumps(
                        {
                            "key": key,
                            "cache_version": CACHE_VERSION,
                            "shapes": {k: list(v.shape) for k, v in tensors.items()},
                        },
                        default=str,
                        indent=1,
                    )
                )
        except OSError as e:
            log.warning("feature cache: cannot write %s (%s)", d, e)
            return None
        return d

    # ---- housekeeping (`vlclassify cache info|prune`) ---------------------------------------------
    def _entries(self) -> list[dict[str, Any]]:
        out = []
        d = self.root / "features"
        for e in sorted(d.iterdir()) if d.is_dir() else []:
            if not e.is_dir() or e.name.startswith("."):
                continue
            try:
                meta = json.loads((e / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {}
            key = meta.get("key", {})
            bb = key.get("backbone", {}) if isinstance(key, dict) else {}
            out.append(
                {
                    "path": e,
                    "kind": key.get("kind") if isinstance(key, dict) else None,
                    "backbone": bb.get("name") if isinstance(bb, dict) else None,
                    "stale": meta.get("cache_version") != CACHE_VERSION,
                    "bytes": _tree_bytes(e),
                    "mtime": e.stat().st_mtime,
                }
            )
        return out

    def _leftovers(self, min_age: float = 3600.0) -> list[Path]:
        """Temp files of interrupted writes, and shard files no manifest names, older than `min_age` s."""
        now = time.time()
        out = []
        for base in (self.root / "store", self.root / "features"):
            if not base.is_dir():
                continue
            for p in base.rglob(".*"):
                if p.parent.name.startswith("."):
                    continue
                if now - p.stat().st_mtime > min_age:
                    out.append(p)
        store_dir = self.root / "store"
        for sd in store_dir.iterdir() if store_dir.is_dir() else []:
            if not sd.is_dir() or sd.name.startswith("."):
                continue
            named = {m.stem for m in sd.glob("*.json")}
            for f in sd.glob("*.safetensors"):
                if f.name.split(".")[0] not in named and now - f.stat().st_mtime > min_age:
                    out.append(f)
        return out

    def info(self, verify: bool = False) -> dict[str, Any]:
        """What the cache holds: store spaces (kind, backbone, view, runtime, rows, shards, bytes),
        per-dataset entries, leftovers of interrupted writes. `verify` checks every shard's checksum
        (damaged shards are dropped, to be recomputed when next needed)."""
        store_ok = (self.root / "store" / "index.sqlite").exists()
        damaged = self.store.verify() if verify and store_ok else []
        spaces = []
        for s in self.store.spaces() if store_ok else []:
            k = s["key"]
            spaces.append(
                {
                    "id": s["id"],
                    "kind": s["kind"],
                    "backbone": s["backbone"],
                    "view": k.get("view", ""),
                    "runtime": k.get("runtime", ""),
                    "rows": s["rows"],
                    "shards": s["shards"],
                    "bytes": s["bytes"],
                    "used": s["used"],
                }
            )
        entries = self._entries()
        left = self._leftovers(min_age=0)
        onnx = self.root / "backbones" / "onnx"
        return {
            "root": str(self.root),
            "spaces": spaces,
            "store_bytes": sum(s["bytes"] for s in spaces),
            "entries": len(entries),
            "entries_bytes": sum(e["bytes"] for e in entries),
            "stale_entries": sum(e["stale"] for e in entries),
            "leftovers": len(left),
            "leftovers_bytes": sum(_tree_bytes(p) for p in left),
            "onnx_bytes": _tree_bytes(onnx) if onnx.is_dir() else 0,
            "damaged": damaged,
        }

    def prune(
        self,
        older_than: float | None = None,
        max_bytes: int | None = None,
        backbone: str | None = None,
        everything: bool = False,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Trim the cache; returns what went (or would go, `dry_run`).

        Always: entries of an older cache version, shards no row points to any more, and leftovers
        of interrupted writes older than an hour. `older_than` (seconds): shards and entries last used
        before then. `backbone`: everything made with that backbone name. `max_bytes`: then the
        least recently used shards and entries until the rest fits. `everything`: the whole store and
        every entry (ONNX trunk exports stay: they are backbones, not features)."""
        import shutil

        now = time.time()
        shards_out: list[dict[str, Any]] = []
        entries_out: list[dict[str, Any]] = []
        store_ok = (self.root / "store" / "index.sqlite").exists()
        shards = self.store.shards() if store_ok else []
        names = {s["id"]: s["backbone"] for s in self.store.spaces()} if store_ok else {}
        entries = self._entries()
        for sh in shards:
            if (
                everything
                or (backbone and names.get(sh["space"]) == backbone)
                or (older_than is not None and (sh["used"] or sh["created"] or 0) < now - older_than)
                or self.store.live_rows(sh["name"]) == 0
            ):
                shards_out.append(sh)
        for e in entries:
            if everything or e["stale"] or (backbone and e["backbone"] == backbone):
                entries_out.append(e)
            elif older_than is not None and e["mtime"] < now - older_than:
                entries_out.append(e)
        if max_bytes is not None:
            gone = {s["name"] for s in shards_out} | {str(e["path"]) for e in entries_out}
            rest = [("shard", s["used"] or s["created"] or 0, s["bytes"], s) for s in shards if s["name"] not in gone]
            rest += [("entry", e["mtime"], e["bytes"], e) for e in entries if str(e["path"]) not in gone]
            total = sum(r[2] for r in rest)
            for kind, _, size, obj in sorted(rest, key=lambda r: r[1]):
                if total <= max_bytes:
                    break
                (shards_out if kind == "shard" else entries_out).append(obj)
                total -= size
        left = self._leftovers()
        report = {
            "shards": len(shards_out),
            "rows": sum(s["rows"] for s in shards_out),
            "bytes": sum(s["bytes"] for s in shards_out) + sum(e["bytes"] for e in entries_out),
            "entries": len(entries_out),
            "leftovers": len(left),
            "dry_run": dry_run,
        }
        report["bytes"] += sum(_tree_bytes(p) for p in left)
        if dry_run:
            return report
        for sh in shards_out:
            self.store.drop_shard(sh["name"])
        if everything and store_ok:
            for sid in names:
                self.store.drop_space(sid)
        for e in entries_out:
            shutil.rmtree(e["path"], ignore_errors=True)
        for p in left:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return report


def _tree_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
