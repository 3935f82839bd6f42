"""Content hashes of images: the identity that duplicate detection and the per-image feature store share.

A file's hash is the SHA-256 of its bytes, remembered per (path, size, mtime) for the life of the
process, so a dataset read twice in one run is hashed once. An in-memory array hashes its shape,
dtype and bytes. Two items with the same hash are the same image, whatever their paths.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import numpy as np

from ..errors import DataError
from ..utils import sha256_file
from .items import Item


@lru_cache(maxsize=1 << 20)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_content_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes; errors name the file."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DataError(f"{p}: image file not found") from None
    return _file_sha256(p, st.st_size, st.st_mtime_ns)


def array_content_hash(arr: np.ndarray) -> str:
    """SHA-256 (hex) of an in-memory image: its shape, dtype and bytes."""
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def content_hash(item: Item) -> str | None:
    """The item's image content hash, or None for a text-only item."""
    if item.image is None:
        return None
    if isinstance(item.image, np.ndarray):
        return array_content_hash(item.image)
    from .webdataset import parse_member_ref, read_member

    if parse_member_ref(item.image):  # an image inside a WebDataset tar: the hash its bytes have as a file
        return hashlib.sha256(read_member(item.image)).hexdigest()
    return file_content_hash(item.image)
