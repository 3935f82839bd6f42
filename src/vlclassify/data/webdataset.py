"""WebDataset input: tar shards in the img2dataset / open_clip layout.

    shards/{00000..00099}.tar?label=json:category&text=txt

Each sample is the tar members sharing a key: `{key}.jpg|jpeg|png|webp` (the image), `{key}.txt`
(caption), `{key}.json` (labels and task columns), optionally `{key}.cls` (an integer class).
Options after `?`:

    label=json:FIELD | cls      the main single-label class (default json:label)
    labels=json:FIELD           multi-label: a JSON list or a space-separated string
    text=txt | json:FIELD | none   the paired text (default txt; a missing member is no text)
    tasks=F1,F2                 task columns: json fields
    classes=A,B,...             the class list; default: a first pass over the json members
    (a json `split` field of train/val/test splits the data, as a manifest's split column does)

Two ways in. Extraction streams (`iter_samples`, read with the `webdataset` package): tars are
read one after another, nothing is listed beforehand. Fit/eval need a `Dataset` with its class
list, so `load_webdataset` makes one pass over the tars (headers, json and txt members; images are
skipped by seeking) and gives each item its image member as a `MemberSource` (tar, offset,
size), which reads one image without scanning. Only uncompressed `.tar` shards, which img2dataset
writes, can be read by item.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError
from ..utils import atomic_path, json_fingerprint
from .items import Dataset, Item
from .source import MemberSource, file_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def is_webdataset(base: str) -> bool:
    """True for a spec naming tar shards: `x.tar`, `x-{000..009}.tar`, `a.tar::b.tar`."""
    return base.split("::")[-1].lower().endswith(".tar")


def expand_shards(base: str) -> list[str]:
    """The tar paths of a brace/`::` pattern (webdataset's expansion), each checked to exist."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(base)
    if not urls:
        raise DataError(f"data {base!r}: the pattern names no tar file")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"data {base!r}: tar shard not found: {missing[0]}{more}")
    return urls


def _image_ext(exts: Sequence[str]) -> str | None:
    return next((e for e in IMAGE_EXTS if e in exts), None)


def iter_samples(tar: str, text: str = "txt") -> Iterator[tuple[str, bytes | None, str | None]]:
    """Stream one tar with the webdataset package, in tar order: (where = tar:key, image bytes or
    None when the sample has no image member, caption per `text` = txt | json:FIELD | none)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    kind, name = _field(text, "text")
    with open(tar, "rb") as stream:
        samples = group_by_keys(tar_file_expander([{"url": tar, "stream": stream}]))
        while True:
            try:
                sample = next(samples, None)
            except (tarfile.TarError, OSError, ValueError) as e:
                msg = e.args[0] if e.args else e
                raise DataError(f"{tar}: cannot read the tar shard ({type(e).__name__}: {msg})") from None
            if sample is None:
                return
            where = f"{tar}:{sample['__key__']}"
            ext = _image_ext([k for k in sample if not k.startswith("__")])
            caption = None
            if kind == "txt" and "txt" in sample:
                caption = sample["txt"].decode("utf-8", errors="replace").strip() or None
            elif kind == "json" and "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except ValueError as e:
                    raise DataError(f"{where}.json: invalid JSON ({e})") from None
                value = meta.get(name) if isinstance(meta, dict) else None
                caption = (str(value).strip() or None) if value is not None else None
            yield where, (sample[ext] if ext else None), caption


def _field(spec: str, what: str) -> tuple[Literal["json"], str] | tuple[Literal["txt", "cls", "none"], None]:
    """`json:FIELD` -> ("json", FIELD); `txt`/`cls`/`none` -> (that, None)."""
    kind, _, name = spec.partition(":")
    if kind == "json" and name:
        return "json", name
    if kind == "txt" and not name:
        return "txt", None
    if kind == "cls" and not name:
        return "cls", None
    if kind == "none" and not name:
        return "none", None
    raise DataError(f"webdataset option {what}={spec!r}: expected json:FIELD, txt, cls or none")


def _scan(tar: str) -> Iterator[dict[str, Any]]:
    """One tar's samples in order: {key, members: {ext: (offset, size)}, json, txt, cls}, reading
    only the small members (headers let tarfile seek past the images)."""
    try:
        tf = tarfile.open(tar, "r:")
    except tarfile.ReadError as e:
        raise DataError(f"{tar}: not an uncompressed tar ({e}); fit/eval read items by offset") from None
    from webdataset.tariterators import base_plus_ext

    with tf:
        cur: dict[str, Any] | None = None
        for ti in tf:
            if not ti.isreg():
                continue
            key, ext = base_plus_ext(ti.name)
            if key is None:
                continue
            ext = ext.lower()
            if cur is None or cur["key"] != key:
                if cur is not None:
                    yield cur
                cur = {"key": key, "members": {}}
            cur["members"][ext] = (ti.offset_data, ti.size)
            if ext in ("json", "txt", "cls"):
                f = tf.extractfile(ti)  # a regular member (isreg above): never None
                assert f is not None
                cur[ext] = f.read()
            # keep memory flat over a long tar (typeshed's TarFile lacks the `members` list it has)
            tf.members = []  # type: ignore[attr-defined]
        if cur is not None:
            yield cur


def _label_values(value: Any, multi: bool) -> list[str]:
    if value is None:
        return []
    if multi:
        vals = value if isinstance(value, list) else str(value).split()
        return [str(v).strip() for v in vals if str(v).strip()]
    s = str(value).strip()
    return [s] if s else []


def _sorted_classes(names: set[str]) -> list[str]:
    """Class names sorted, numerically when they are all integers (cls members)."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def load_webdataset(
    base: str,
    label: str | None = None,
    labels: str | None = None,
    text: str = "txt",
    tasks: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
) -> dict[str, Dataset]:
    """Tar shards -> splits of `Dataset` (see the module doc); errors name the tar, sample key and field."""
    tars = expand_shards(base)
    if label and labels:
        raise DataError("webdataset: give label= or labels=, not both")
    multilabel = labels is not None
    main = _field(labels or label or "json:label", "labels" if multilabel else "label")
    txt = _field(text, "text")
    if main[0] not in ("json", "cls"):
        raise DataError(f"webdataset: the label comes from json:FIELD or cls, got {label or labels!r}")
    task_cols = list(tasks or [])
    rows = []
    for tar in tars:
        for s in _scan(tar):
            where = f"{tar}:{s['key']}"
            ext = _image_ext(list(s["members"]))
            if ext is None:
                raise DataError(f"{where}: sample has no image member ({', '.join(IMAGE_EXTS)})")
            meta: dict[str, Any] = {}
            if "json" in s:
                try:
                    meta = json.loads(s["json"])
                except ValueError as e:
                    raise DataError(f"{where}.json: invalid JSON ({e})") from None
                if not isinstance(meta, dict):
                    raise DataError(f"{where}.json: expected a JSON object")
            if main[0] == "cls":
                if "cls" not in s:
                    raise DataError(f"{where}: no .cls member (label=cls)")
                names = _label_values(s["cls"].decode().strip(), False)
            else:
                if main[1] not in meta:
                    raise DataError(f"{where}.json: no field {main[1]!r} (fields: {', '.join(sorted(meta)) or 'none'})")
                names = _label_values(meta[main[1]], multilabel)
            if not names:
                raise DataError(f"{where}: empty label")
            caption = None
            if txt[0] == "txt" and "txt" in s:
                caption = s["txt"].decode("utf-8", errors="replace").strip() or None
            elif txt[0] == "json" and meta.get(txt[1]) is not None:
                caption = str(meta[txt[1]]).strip() or None
            task_vals = {}
            for t in task_cols:
                v = str(meta.get(t, "")).strip()
                if not v:
                    raise DataError(f"{where}.json: empty or missing task field {t!r}")
                task_vals[t] = v
            split = str(meta.get("split") or "all").strip().lower()
            if split not in ("train", "val", "test", "all"):
                raise DataError(f"{where}.json: split must be train, val or test, got {split!r}")
            off, size = s["members"][ext]
            rows.append((tar, s["key"], f"{s['key']}.{ext}", off, size, names, caption, task_vals, split))
    if not rows:
        raise DataError(f"data {base!r}: the tar shards hold no samples")
    classnames = list(classes) if classes else _sorted_classes({n for r in rows for n in r[5]})
    cindex = {c: i for i, c in enumerate(classnames)}
    task_classes = {t: sorted({r[7][t] for r in rows}) for t in task_cols}
    keys = {tar: file_key(tar) for tar in tars}
    splits: dict[str, list[Item]] = {}
    for tar, key, member, off, size, names, caption, task_vals, split in rows:
        for n in names:
            if n not in cindex:
                raise DataError(f"{tar}:{key}: label {n!r} is not in the class list ({', '.join(classnames)})")
        idx = sorted({cindex[n] for n in names})
        splits.setdefault(split, []).append(
            Item(
                image=MemberSource(tar, member, off, size),
                label=None if multilabel else idx[0],
                labels=tuple(idx) if multilabel else None,
                text=caption,
                tasks={t: task_classes[t].index(v) for t, v in task_vals.items()} or None,
                key=f"{keys[tar]}#{key}",
            )
        )
    if "all" in splits and len(splits) > 1:
        raise DataError(f"data {base!r}: some samples have a json 'split' and some do not")
    name = Path(tars[0]).parent.name or Path(tars[0]).stem
    src = json_fingerprint([keys[t] for t in tars])
    return {
        s: Dataset(items=its, classnames=classnames, name=name, multilabel=multilabel, tasks=task_classes, source=src)
        for s, its in splits.items()
    }


def shard_signature(tar: str) -> str:
    """Path, size and mtime of a tar: a finished-input mark for resumable extraction."""
    return file_key(os.fspath(tar))


def dataset_samples(ds: Dataset, label_field: str = "label") -> Iterator[dict[str, Any]]:
    """A `Dataset` as WebDataset samples: the image's own bytes (so its content hash, hence its
    stored features, stay the same; arrays become PNG), `json` with the class name(s) under
    `label_field` and the task columns, `txt` with the paired text."""
    for i, it in enumerate(ds.items):
        if it.image is None:
            raise DataError(f"{ds.name}: item {i} ({it.key}) has no image; a WebDataset sample needs one")
        ext, data = it.image.suffix, it.image.read_bytes()
        meta: dict[str, Any] = {}
        if it.labels is not None:
            meta[label_field] = [ds.classnames[l] for l in it.labels]
        elif it.label is not None:
            meta[label_field] = ds.classnames[it.label]
        for t, v in (it.tasks or {}).items():
            meta[t] = ds.tasks[t][v]
        sample = {"__key__": f"{i:08d}", ext: data, "json": json.dumps(meta).encode()}
        if it.text:
            sample["txt"] = it.text.encode()
        yield sample


def write_webdataset(
    samples: Iterator[dict[str, Any]], out_dir: str | os.PathLike, per_shard: int = 1000, prefix: str = "shard"
) -> list[Path]:
    """Write samples ({"__key__": key, ext: bytes, ...}) as `out_dir/{prefix}-00000.tar`, ... with
    the webdataset package's TarWriter, `per_shard` samples each, every tar written atomically."""
    from webdataset import TarWriter

    out = Path(out_dir)
    paths: list[Path] = []
    it = iter(samples)
    while True:
        first = next(it, None)
        if first is None:
            return paths
        path = out / f"{prefix}-{len(paths):05d}.tar"
        with atomic_path(path) as tmp:
            with TarWriter(str(tmp), encoder=False) as w:
                w.write(first)
                for _, s in zip(range(per_shard - 1), it):
                    w.write(s)
        paths.append(path)
