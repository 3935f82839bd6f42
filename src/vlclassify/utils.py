"""Small helpers shared across the package: atomic writes, hashing, seeding, JSON.

torch is imported inside the two helpers that use it: the ONNX predict path (onnx_predict.py)
imports this module and must not start torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def default_cache_dir() -> Path:
    """`$VLCLASSIFY_CACHE`, else `$XDG_CACHE_HOME/vlclassify`, else `~/.cache/vlclassify`."""
    env = os.environ.get("VLCLASSIFY_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlclassify"


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 4 MiB chunks: the one full-file hash (weights
    checks, store shard checksums, image content hashes, fingerprints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike, full: bool = True) -> str:
    """sha256 of a file's bytes (or of its size + first/last MiB when `full` is False)."""
    if full:
        return sha256_file(path)[:16]
    h = hashlib.sha256()
    p = Path(path)
    with p.open("rb") as f:
        size = p.stat().st_size
        h.update(str(size).encode())
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


def cached_file_fingerprint(path: str | os.PathLike) -> str:
    """`file_fingerprint(path)` (all bytes), remembered on disk per (path, size, mtime) in the cache
    folder: hashing 110 MB of backbone weights at every start was a third of a cold `predict`."""
    p = Path(path)
    st = p.stat()
    memo_path = default_cache_dir() / "fingerprints.json"
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = file_fingerprint(p)
        try:
            write_json(memo_path, memo)
        except OSError:  # a read-only cache folder only costs the re-hash next time
            pass
    return str(memo[key])


def json_fingerprint(obj: Any) -> str:
    """A 16-hex-digit SHA-256 of `obj` as sorted JSON: cache keys that survive dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds.

    Readers never see a half-written file or folder, and a crash leaves the old one intact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    work = tmp if is_dir else tmp / target.name
    try:
        yield work
        _default_mode(work)
        if is_dir:
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(work, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(work, target)
        else:
            os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_mode(path: Path) -> None:
    """Give a finished temp file/folder the permissions a plain `open`/`mkdir` would have
    (mkdtemp makes 0700 folders and some writers make 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    if path.is_dir():
        os.chmod(path, 0o777 & ~umask)
    elif path.exists():
        os.chmod(path, 0o666 & ~umask)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a ConfigError naming the file when it is missing or not JSON."""
    from .errors import ConfigError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG seeded to `seed`, then give the caller's RNG state back.

    The one seed policy: a module's initialisation or a training segment is reproducible from its
    own seed, and nothing outside the block sees its draws (the global RNG is never reseeded for
    good). Data order uses explicit `torch.Generator`s, few-shot sampling `random.Random(seed)`.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


SMALL_WORK = 2**24  # multiply-adds per step below which extra intra-op threads only add synchronisation


@contextlib.contextmanager
def torch_threads(threads: int | None = 0, work: int | None = None) -> Iterator[int]:
    """Run the block with `threads` torch intra-op threads, then restore the old setting.

    The one thread policy. `threads` > 0: exactly that many. 0 or None (auto): one thread when
    `work` (a rough multiply-add count per step) is below SMALL_WORK or the machine is already
    loaded (load average >= cores: a VT-CLIP step took 3 s with 2 threads and 0.34 s with 1 at
    load 16 on 2 cores), else the current setting.
    """
    import torch

    old = torch.get_num_threads()
    if threads:
        n = int(threads)
    else:
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1)
        n = 1 if busy or (work is not None and work < SMALL_WORK) else old
    if n != old:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


# What a model folder holds when vlclassify wrote it: fit / update / eval / export outputs.
MODEL_FILES = ("config.json", "model.safetensors", "fit.json", "split.json", "model.onnx", "model.onnx.json")
MODEL_PATTERNS = ("eval-*.json", "predictions-*.csv", "plots-*")


def _is_model_folder(folder: Path) -> bool:
    """config.json (with vlclassify's `format_version` and `method`) beside model.safetensors."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(cfg, dict) and {"format_version", "method"} <= set(cfg) and (folder / "model.safetensors").is_file()
    )


def check_overwrite(out: str | os.PathLike, overwrite: bool, reads: Iterable[str] = ()) -> Path:
    """-> `out` resolved, where a command may write a model folder; else one line saying why not.

    A new or empty folder is fine. A non-empty one needs `overwrite` and must be a vlclassify model
    folder holding only what vlclassify writes there (MODEL_FILES, MODEL_PATTERNS): --overwrite never
    replaces the current directory, HOME, `/`, a data path being read or a folder above one, or a
    folder of anyone's own files. Checked before any work."""
    from fnmatch import fnmatch

    from .errors import DataError

    given, path = str(out), Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {given}: exists and is a file; give a folder")
    danger = {Path.cwd().resolve(): "the current directory", Path.home().resolve(): "your home folder"}
    danger[Path(path.anchor)] = "the file-system root"
    if path in danger:
        raise DataError(f"--out {given}: is {danger[path]}; give a new folder for the model (e.g. --out model)")
    for spec in reads:
        base = spec.partition("?")[0].split("{")[0]  # a WebDataset brace pattern reads its folder
        if not base or not Path(base).exists():  # a built-in data set (fashion-mnist) is no path
            continue
        data = Path(base).expanduser().resolve()
        if path == data or path in data.parents:
            what = "the data being read" if path == data else f"a folder holding the data being read ({spec})"
            raise DataError(f"--out {given}: is {what}; give a new folder for the model")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise DataError(f"--out {given}: folder is not empty; pass --overwrite to replace what it holds")
    if not _is_model_folder(path):
        raise DataError(
            f"--out {given}: not a vlclassify model folder (no config.json + model.safetensors written by "
            "vlclassify); --overwrite only replaces a model, give a new folder"
        )
    foreign = sorted(
        p.name
        for p in path.iterdir()
        if p.name not in MODEL_FILES and not any(fnmatch(p.name, g) for g in MODEL_PATTERNS)
    )
    if foreign:
        raise DataError(
            f"--out {given}: holds {foreign[0]}"
            + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
            + ", which vlclassify did not write; --overwrite would delete it: move it or give a new folder"
        )
    return path


def write_json_and_markdown(result: dict, out_dir: str | os.PathLike, stem: str, markdown: str) -> tuple[Path, Path]:
    """A benchmark's pair: `<stem>.json` (every run) and `<stem>.md` (the table), each atomically."""
    out_dir = Path(out_dir)
    jp, mp = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(jp, result)
    with atomic_path(mp) as tmp:
        tmp.write_text(markdown)
    return jp, mp


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings (`--opt`, `--backbone-opt`) -> dict; values are JSON when they parse, else strings."""
    from .errors import DataError

    out: dict[str, Any] = {}
    for p in pairs:
        if not p.strip():
            continue
        k, eq, v = p.partition("=")
        if not eq:
            raise DataError(f"option {p!r} must be key=value")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's PEP 562 `__getattr__` and `__dir__`: each public name in `exports` (name ->
    submodule) is imported at its first use, so that importing the package imports nothing
    behind it (the torch-free predict path imports data, methods and training)."""
    import importlib

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
