"""The per-image feature store: one row per image, shared by every dataset, split and run.

Rows live in *spaces*: one per feature identity (backbone config + weights fingerprint,
preprocessing, view, runtime and precision for image features; backbone for text embeddings).
Inside a space a row is keyed by the image's content hash (`ImageSource.hash`) or the
text's SHA-256, so any dataset containing an already-seen image reuses its row, and a changed
weight file or preprocessing is another space: a row is never reused across identities.

    <store>/index.sqlite                     key -> (shard, row); shards with checksums; spaces
    <store>/<space>/space.json               the space's full key
    <store>/<space>/<shard>.safetensors      float32 fields, e.g. image [n, D], pooled [n, F]
    <store>/<space>/<shard>.spatial.safetensors   spatial [n, P, D] float16 (optional)
    <store>/<space>/<shard>.json             manifest: the row keys, the files' SHA-256, fields

A shard's files are written atomically, then its manifest: the manifest is the commit point.
The SQLite index is derived from the manifests (`sync` merges any it has not seen, e.g. those of
a killed run or of other ranks), so a lost or damaged index is rebuilt from them. Reads are
memory-mapped (numpy memmap over the safetensors data), so only the rows asked for are paged in;
each shard's checksum is verified on its first read in a process, and a damaged shard is dropped
(its rows become missing and are recomputed), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import sqlite3
import struct
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from ..errors import ConfigError
from ..utils import atomic_path, json_fingerprint, sha256_file

log = logging.getLogger(__name__)
STORE_VERSION = 1  # bump when the layout or the meaning of a row changes: old spaces are then ignored
MANIFEST_VERSION = 1
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spaces(id TEXT PRIMARY KEY, key TEXT NOT NULL, kind TEXT, backbone TEXT, created REAL);
CREATE TABLE IF NOT EXISTS shards(
  name TEXT PRIMARY KEY, space TEXT NOT NULL, rows INTEGER, bytes INTEGER, files TEXT, spatial INTEGER,
  grid TEXT, created REAL, used REAL);
CREATE TABLE IF NOT EXISTS rows(
  space TEXT NOT NULL, key TEXT NOT NULL, shard TEXT NOT NULL, row INTEGER NOT NULL, spatial INTEGER NOT NULL,
  PRIMARY KEY(space, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rows_by_shard ON rows(shard);
CREATE TABLE IF NOT EXISTS inputs(space TEXT NOT NULL, input TEXT NOT NULL, PRIMARY KEY(space, input));
"""


class DamagedShard(Exception):
    """A shard whose bytes do not match the checksum in its manifest."""


def text_key(text: str) -> str:
    """The store key of a text row: the SHA-256 of the text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tensor_maps(path: Path) -> dict[str, np.memmap]:
    """Memory-map every tensor of a safetensors file (header: u64 length, JSON; then raw data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, _ = info["data_offsets"]
        out[name] = np.memmap(
            path, dtype=_DTYPES[info["dtype"]], mode="r", offset=base + start, shape=tuple(info["shape"])
        )
    return out


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) checked in this process


def _verify(path: Path, expected: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DamagedShard(f"{path}: missing") from None
    sig = (str(path), st.st_size, st.st_mtime_ns, expected)
    if sig in _VERIFIED:
        return
    if sha256_file(path) != expected:
        raise DamagedShard(f"{path}: checksum mismatch")
    _VERIFIED.add(sig)


@dataclass
class Rows:
    """Where a list of keys lives: `shard[i]`/`row[i]` (shard "" = missing), row-aligned with the keys."""

    space: str
    shard: np.ndarray  # [N] object: shard name, "" when the key is not in the store
    row: np.ndarray  # [N] int64 row inside the shard, -1 when missing

    def __len__(self) -> int:
        return len(self.row)

    @property
    def found(self) -> np.ndarray:
        """[N] bool: rows the index located."""
        return self.row >= 0  # [N] bool


class FeatureStore:
    """Shards + SQLite index under `root`. `read_only` (other ranks of a distributed run) never writes the index."""

    def __init__(self, root: str | Path, read_only: bool = False, open_shards: int = 64) -> None:
        self.root = Path(root)
        self.read_only = read_only
        self._db: sqlite3.Connection | None = None
        self._maps: OrderedDict[str, dict[str, np.memmap]] = OrderedDict()  # LRU of memory-mapped shard files
        self._open_shards = open_shards
        self._keys: dict[str, dict[str, Any]] = {}  # space id -> key, checked this process

    # ---- index ------------------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        """The SQLite index, opened on first use (a damaged one is rebuilt from the shard manifests)."""
        if self._db is None:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / "index.sqlite"
            try:
                self._db = self._connect(path)
            except sqlite3.DatabaseError as e:  # a damaged index is derived data: rebuild it from the manifests
                log.warning("feature store: index %s unreadable (%s); rebuilding it from the shard manifests", path, e)
                os.replace(path, path.with_name(f"index.damaged-{int(time.time())}.sqlite"))
                self._db = self._connect(path)
        return self._db

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), timeout=120, isolation_level=None)
        db.executescript(_SCHEMA)
        db.execute("SELECT count(*) FROM shards").fetchone()
        return db

    def close(self) -> None:
        """Close the index and drop the shard memory maps (e.g. before pruning files)."""
        if self._db is not None:
            self._db.close()
            self._db = None
        self._maps.clear()

    def space_dir(self, sid: str) -> Path:
        """The folder of a space's shards."""
        return self.root / sid

    @staticmethod
    def space_id(key: dict[str, Any]) -> str:
        """The id of the space for `key`: a fingerprint of the normalised key and the store version."""
        return json_fingerprint({**_normalise(key), "store_version": STORE_VERSION})

    def space(self, key: dict[str, Any], create: bool = True) -> str | None:
        """The id of the space for `key`, registered on first use (`create=False`: None when there is
        none yet). A stored key (index or space.json) that differs from the requested one, after a
        fingerprint collision or an edit, drops the space: rows are never misread."""
        norm = _normalise(key)
        sid = self.space_id(key)
        if self._keys.get(sid) != norm:
            sj = self.space_dir(sid) / "space.json"
            row = self.db.execute("SELECT key FROM spaces WHERE id=?", (sid,)).fetchone()
            stored = [json.loads(row[0])] if row else []
            if sj.exists():
                try:
                    stored.append(json.loads(sj.read_text()).get("key"))
                except ValueError:
                    stored.append(None)
            if any(k != norm for k in stored):
                if self.read_only:
                    raise ConfigError(
                        f"feature store {self.root}: space {sid} holds another key; run it on rank 0 first"
                    )
                log.warning("feature store: space %s holds another key; dropping its rows", sid)
                self.drop_space(sid)
                stored = []
            if not stored and not create:
                return None
            if not sj.exists():  # also from read-only ranks: it lets rank 0 adopt their shards
                with atomic_path(sj) as tmp:
                    tmp.write_text(json.dumps({"id": sid, "key": norm, "store_version": STORE_VERSION}, indent=1))
            if not self.read_only and row is None:
                self.db.execute(
                    "INSERT OR REPLACE INTO spaces VALUES (?,?,?,?,?)",
                    (
                        sid,
                        json.dumps(norm, sort_keys=True),
                        norm.get("kind"),
                        norm.get("backbone", {}).get("name"),
                        time.time(),
                    ),
                )
            self._keys[sid] = norm
        self.sync(sid)
        return sid

    def sync(self, sid: str) -> int:
        """Merge the manifests of `sid` the index has not seen (other ranks', a killed run's); returns how many."""
        if self.read_only:
            return 0
        d = self.space_dir(sid)
        if not d.is_dir():
            return 0
        known = {r[0] for r in self.db.execute("SELECT name FROM shards WHERE space=?", (sid,))}
        pending = sorted(p for p in d.glob("*.json") if p.name != "space.json" and p.stem not in known)
        for p in pending:
            try:
                self._merge(sid, json.loads(p.read_text()))
            except (OSError, ValueError, KeyError) as e:
                log.warning("feature store: unreadable manifest %s (%s); ignoring it", p, e)
        return len(pending)

    def _merge(self, sid: str, m: dict[str, Any]) -> None:
        name, keys, spatial = m["name"], m["keys"], int(bool(m.get("spatial")))
        size = sum((self.space_dir(sid) / f).stat().st_size for f in m["files"])
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT OR REPLACE INTO shards VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    sid,
                    len(keys),
                    size,
                    json.dumps(m["files"]),
                    spatial,
                    json.dumps(m.get("grid")),
                    m["created"],
                    m["created"],
                ),
            )
            db.executemany(
                "INSERT INTO rows VALUES (?,?,?,?,?) ON CONFLICT(space, key) DO UPDATE SET "
                "shard=excluded.shard, row=excluded.row, spatial=excluded.spatial "
                "WHERE excluded.spatial >= rows.spatial",
                [(sid, k, name, i, spatial) for i, k in enumerate(keys)],
            )
            db.executemany("INSERT OR IGNORE INTO inputs VALUES (?,?)", [(sid, x) for x in m.get("inputs", [])])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def lookup(self, sid: str, keys: Sequence[str], spatial: bool = False) -> Rows:
        """Locate `keys` (a row without spatial tokens does not serve a spatial request)."""
        pos: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            pos.setdefault(k, []).append(i)
        shard = np.full(len(keys), "", dtype=object)
        row = np.full(len(keys), -1, dtype=np.int64)
        uniq = list(pos)
        for s in range(0, len(uniq), 5000):
            chunk = uniq[s : s + 5000]
            q = f"SELECT key, shard, row, spatial FROM rows WHERE space=? AND key IN ({','.join('?' * len(chunk))})"
            for k, sh, r, sp in self.db.execute(q, (sid, *chunk)):
                if sp or not spatial:
                    shard[pos[k]] = sh
                    row[pos[k]] = r
        return Rows(sid, shard, row)

    def input_done(self, sid: str, inputs: Iterable[str]) -> set[str]:
        """Which of `inputs` (e.g. WebDataset tar signatures) a finished shard recorded as fully stored."""
        inputs = list(inputs)
        done: set[str] = set()
        for s in range(0, len(inputs), 5000):
            chunk = inputs[s : s + 5000]
            q = f"SELECT input FROM inputs WHERE space=? AND input IN ({','.join('?' * len(chunk))})"
            done |= {r[0] for r in self.db.execute(q, (sid, *chunk))}
        return done

    # ---- reading ------------------------------------------------------------------------------
    def _shard_info(self, name: str) -> tuple[str, dict[str, str], list[int] | None]:
        r = self.db.execute("SELECT space, files, grid FROM shards WHERE name=?", (name,)).fetchone()
        if r is None:
            raise DamagedShard(f"shard {name}: not in the index")
        return r[0], json.loads(r[1]), json.loads(r[2])

    def _open(self, sid: str, name: str) -> dict[str, np.memmap]:
        if name in self._maps:
            self._maps.move_to_end(name)
            return self._maps[name]
        _, files, _ = self._shard_info(name)
        maps: dict[str, np.memmap] = {}
        for f, digest in files.items():
            p = self.space_dir(sid) / f
            _verify(p, digest)
            try:
                maps.update(_tensor_maps(p))
            except (OSError, ValueError, KeyError, struct.error) as e:
                raise DamagedShard(f"{p}: {e}") from None
        self._maps[name] = maps
        while len(self._maps) > self._open_shards:
            self._maps.popitem(last=False)
        return maps

    def grid(self, rows: Rows) -> tuple[int, int] | None:
        """The spatial grid (h, w) recorded by the shards of `rows` (one per space), or None."""
        for n in dict.fromkeys(rows.shard[rows.found]):
            r = self.db.execute("SELECT grid FROM shards WHERE name=?", (n,)).fetchone()
            g = json.loads(r[0]) if r else None  # a shard dropped as damaged has no row any more
            if g:
                return (int(g[0]), int(g[1]))
        return None

    def read(
        self, rows: Rows, fields: Sequence[str], out: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Gather `fields` of the found rows into `out[field][i]` (allocated on first use, zeros elsewhere).

        Returns ([N] bool mask of the rows actually read, out): a damaged shard is dropped from the
        index and its rows come back False, for the caller to recompute."""
        ok = rows.found.copy()
        by_shard: dict[str, list[int]] = {}
        for i in np.flatnonzero(ok).tolist():
            by_shard.setdefault(rows.shard[i], []).append(i)
        out = {} if out is None else out
        touched = []
        for name, idx in by_shard.items():
            idx_a = np.asarray(idx)
            try:
                maps = self._open(rows.space, name)
                missing = [f for f in fields if f not in maps]
                if missing:
                    raise DamagedShard(f"shard {name}: no field(s) {', '.join(missing)}")
            except DamagedShard as e:
                log.warning("feature store: %s; its rows will be recomputed", e)
                self.drop_shard(name)
                ok[idx_a] = False
                continue
            r = rows.row[idx_a]
            order = np.argsort(r, kind="stable")  # ascending rows: sequential page-ins
            for f in fields:
                src = maps[f]
                if f not in out:
                    out[f] = np.zeros((len(rows), *src.shape[1:]), dtype=src.dtype)
                out[f][idx_a[order]] = src[r[order]]
            touched.append(name)
        if touched and not self.read_only:  # last use, for `cache prune --older-than/--max-size`
            now = time.time()
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE shards SET used=? WHERE name=?", [(now, n) for n in touched])
            self.db.execute("COMMIT")
        return ok, out

    # ---- writing ------------------------------------------------------------------------------
    def writer(self, sid: str, name: str | None = None, shard_rows: int = 1024) -> ShardWriter:
        """A ShardWriter appending rows to space `sid`."""
        return ShardWriter(self, sid, name or _writer_name(), shard_rows)

    def commit(self, sid: str, manifest: dict[str, Any]) -> None:
        """Register a written manifest in the index now (single process); other ranks leave it to `sync`."""
        if not self.read_only:
            self._merge(sid, manifest)

    # ---- removing -----------------------------------------------------------------------------
    def drop_shard(self, name: str) -> None:
        """Forget a shard (index rows, its files and manifest). Its space's finished-input marks go too,
        since those inputs are no longer fully stored."""
        self._maps.pop(name, None)
        if self.read_only:
            return
        r = self.db.execute("SELECT space, files FROM shards WHERE name=?", (name,)).fetchone()
        if r is None:
            return
        sid, files = r[0], json.loads(r[1])
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM rows WHERE shard=?", (name,))
        self.db.execute("DELETE FROM shards WHERE name=?", (name,))
        self.db.execute("DELETE FROM inputs WHERE space=?", (sid,))
        self.db.execute("COMMIT")
        for f in [*files, f"{name}.json"]:
            (self.space_dir(sid) / f).unlink(missing_ok=True)

    def drop_space(self, sid: str) -> None:
        """Delete a space: its rows, shards and files."""
        import shutil

        for n in [r[0] for r in self.db.execute("SELECT name FROM shards WHERE space=?", (sid,))]:
            self._maps.pop(n, None)
        self.db.execute("BEGIN IMMEDIATE")
        for table, col in (("rows", "space"), ("shards", "space"), ("inputs", "space"), ("spaces", "id")):
            self.db.execute(f"DELETE FROM {table} WHERE {col}=?", (sid,))
        self.db.execute("COMMIT")
        self._keys.pop(sid, None)
        shutil.rmtree(self.space_dir(sid), ignore_errors=True)

    # ---- reporting ----------------------------------------------------------------------------
    def spaces(self) -> list[dict[str, Any]]:
        """Every space with its key, live rows, shards, bytes and last use (for `vlclassify cache info`)."""
        out = []
        for sid, key, kind, bb, created in self.db.execute("SELECT * FROM spaces ORDER BY created"):
            n_sh, n_bytes, used = self.db.execute(
                "SELECT count(*), coalesce(sum(bytes), 0), max(used) FROM shards WHERE space=?", (sid,)
            ).fetchone()
            (n_rows,) = self.db.execute("SELECT count(*) FROM rows WHERE space=?", (sid,)).fetchone()
            out.append(
                {"id": sid, "key": json.loads(key), "kind": kind, "backbone": bb, "rows": n_rows, "shards": n_sh}
                | {"bytes": n_bytes, "created": created, "used": used}
            )
        return out

    def shards(self, sid: str | None = None) -> list[dict[str, Any]]:
        """The shards (of one space, or all) with rows, bytes and times, for `vlclassify cache info`."""
        q = "SELECT name, space, rows, bytes, created, used FROM shards" + (" WHERE space=?" if sid else "")
        cols = ("name", "space", "rows", "bytes", "created", "used")
        return [dict(zip(cols, r)) for r in self.db.execute(q, (sid,) if sid else ())]

    def live_rows(self, name: str) -> int:
        """Rows of shard `name` still in the index (a shard with none can be pruned)."""
        return self.db.execute("SELECT count(*) FROM rows WHERE shard=?", (name,)).fetchone()[0]

    def verify(self, sid: str | None = None) -> list[str]:
        """Check every shard's checksum now; drop and return the damaged ones."""
        bad = []
        for sh in self.shards(sid):
            _, files, _ = self._shard_info(sh["name"])
            try:
                for f, digest in files.items():
                    p = self.space_dir(sh["space"]) / f
                    if sha256_file(p) != digest:
                        raise DamagedShard(str(p))
            except (DamagedShard, FileNotFoundError):
                bad.append(sh["name"])
                self.drop_shard(sh["name"])
        return bad


def _normalise(key: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _writer_name() -> str:
    """Unique per process and host, so writers on a shared filesystem never collide."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class ShardWriter:
    """Buffers rows and writes them as shards of `shard_rows`; each finished shard is committed."""

    def __init__(self, store: FeatureStore, sid: str, name: str, shard_rows: int) -> None:
        self.store, self.sid, self.name, self.shard_rows = store, sid, name, max(1, int(shard_rows))
        self.seq = 0
        self.keys: list[str] = []
        self.parts: dict[str, list[np.ndarray]] = {}
        self.grid: tuple[int, int] | None = None
        self.written = 0  # rows written by this writer
        self.shards: list[str] = []  # shard names written by this writer

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: Sequence[str], arrays: dict[str, np.ndarray], grid: tuple[int, int] | None = None) -> None:
        """Append rows (`arrays[field]` [n, ...], row-aligned with `keys`); full shards are written at once."""
        self.keys += list(keys)
        for f, a in arrays.items():
            self.parts.setdefault(f, []).append(np.ascontiguousarray(a))
        if grid is not None:
            self.grid = (int(grid[0]), int(grid[1]))
        while len(self.keys) >= self.shard_rows:
            self._write(self.shard_rows, ())

    def flush(self, inputs: Sequence[str] = ()) -> None:
        """Write what is buffered; `inputs` are recorded as fully stored once this shard is committed."""
        if self.keys or inputs:
            self._write(len(self.keys), inputs)

    def _write(self, n: int, inputs: Sequence[str]) -> None:
        d = self.store.space_dir(self.sid)
        name = f"{self.name}-{self.seq:05d}"
        self.seq += 1
        keys, self.keys = self.keys[:n], self.keys[n:]
        cols = {f: np.concatenate(p) if len(p) > 1 else p[0] for f, p in self.parts.items()}
        self.parts = {f: [a[n:]] for f, a in cols.items() if len(a) > n}
        files: dict[str, str] = {}
        if n:
            main = {f: a[:n] for f, a in cols.items() if f != "spatial"}
            groups = [(f"{name}.safetensors", main)]
            if "spatial" in cols:
                groups.append((f"{name}.spatial.safetensors", {"spatial": cols["spatial"][:n]}))
            for fname, tensors in groups:
                with atomic_path(d / fname) as tmp:
                    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
                    files[fname] = sha256_file(tmp)
        manifest = {
            "version": MANIFEST_VERSION,
            "name": name,
            "space": self.sid,
            "keys": keys,
            "files": files,
            "fields": {f: list(a.shape[1:]) for f, a in cols.items()},
            "spatial": "spatial" in cols,
            "grid": list(self.grid) if self.grid else None,
            "inputs": list(inputs),
            "created": time.time(),
        }
        with atomic_path(d / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(manifest))
        self.store.commit(self.sid, manifest)
        self.written += n
        self.shards.append(name)
