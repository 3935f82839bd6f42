"""Where an image comes from: a file, a member of a tar shard, an in-memory array or uploaded bytes.

Every source can `open()` its bytes, give its content `hash()` and `describe()` itself for errors
(`photos/x.jpg`, `shard-00000.tar:000017.jpg`, `upload.png`). The content hash is the identity
duplicate detection and the per-image feature store share: the SHA-256 of the bytes (a tar member
or upload hashes like the same file on disk; a file's hash is remembered per path, size and mtime
for the life of the process), and for an array the SHA-256 of its shape, dtype and bytes.

A leaf module: it imports nothing of the package but `errors` and `utils`, so every other data
module (items, decode, loaders, webdataset) can build on it without a circle.
"""

from __future__ import annotations

import hashlib
import io
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..errors import DataError
from ..utils import sha256_file


def file_key(path: str | os.PathLike[str]) -> str:
    """An item key for a file that changes when the file does (path, size, mtime); errors name the file."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DataError(f"{p}: image file not found") from None
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


@lru_cache(maxsize=1 << 20)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


class ImageSource(ABC):
    """Where one image's bytes come from (see the module docstring)."""

    @abstractmethod
    def open(self) -> BinaryIO:
        """A binary stream of the encoded image (the caller closes it); errors name the source."""

    @abstractmethod
    def hash(self) -> str:
        """The content hash (hex SHA-256): the feature store's and duplicate detection's key."""

    @abstractmethod
    def describe(self) -> str:
        """The name shown in errors: a path, `shard.tar:member`, an upload's name."""

    @abstractmethod
    def size(self) -> int:
        """Bytes of the encoded image (arrays: of the pixels): only equal sizes are hashed to find copies."""

    @property
    def suffix(self) -> str:
        """The format's file extension without the dot (`jpg`, `png`), as `read_bytes` holds it."""
        return "png"

    def read_bytes(self) -> bytes:
        """The encoded image's bytes, e.g. to write a WebDataset sample whose hash stays the source's."""
        with self.open() as f:
            return f.read()


@dataclass(frozen=True)
class FileSource(ImageSource):
    """An image file on disk."""

    path: str

    def open(self) -> BinaryIO:
        """The file opened for reading; a missing file is an error naming it."""
        try:
            return open(self.path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise DataError(f"{self.path}: image file not found") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot open image file ({e.strerror})") from None

    def hash(self) -> str:
        """SHA-256 of the file's bytes, remembered per (path, size, mtime)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DataError(f"{self.path}: image file not found") from None
        return _file_sha256(self.path, st.st_size, st.st_mtime_ns)

    def describe(self) -> str:
        """The path."""
        return self.path

    def size(self) -> int:
        """The file's size; a missing file is an error naming it."""
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            raise DataError(f"{self.path}: image file not found") from None

    @property
    def suffix(self) -> str:
        """The file's extension, lower case (`png` when it has none)."""
        return os.path.splitext(self.path)[1].lower().lstrip(".") or "png"


@dataclass(frozen=True)
class MemberSource(ImageSource):
    """An image member of an uncompressed tar shard, read by offset without scanning the tar."""

    tar: str
    member: str  # the member's name inside the tar, e.g. 000017.jpg
    offset: int  # where the member's data starts
    length: int  # the member's size in bytes

    def open(self) -> BinaryIO:
        """The member's bytes; a tar changed since it was scanned is an error naming tar and member."""
        try:
            with open(self.tar, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.length)
        except FileNotFoundError:
            raise DataError(f"{self.tar}: tar shard not found") from None
        if len(data) != self.length:
            raise DataError(f"{self.describe()}: the tar shard changed since it was read (member truncated)")
        return io.BytesIO(data)

    def hash(self) -> str:
        """SHA-256 of the member's bytes: the hash the same image has as a file."""
        return hashlib.sha256(self.read_bytes()).hexdigest()

    def describe(self) -> str:
        """`shard.tar:member`."""
        return f"{self.tar}:{self.member}"

    def size(self) -> int:
        """The member's size."""
        return self.length

    @property
    def suffix(self) -> str:
        """The member's extension, lower case."""
        return self.member.rsplit(".", 1)[-1].lower()


@dataclass(frozen=True)
class BytesSource(ImageSource):
    """An encoded image held in memory, e.g. an upload to the service."""

    data: bytes = field(repr=False)
    name: str = "image"  # shown in errors

    def open(self) -> BinaryIO:
        """The bytes as a stream."""
        return io.BytesIO(self.data)

    def hash(self) -> str:
        """SHA-256 of the bytes: the hash the same image has as a file."""
        return hashlib.sha256(self.data).hexdigest()

    def describe(self) -> str:
        """The given name."""
        return self.name

    def size(self) -> int:
        """The byte count."""
        return len(self.data)


@dataclass(frozen=True, eq=False)
class ArraySource(ImageSource):
    """Pixels in memory: a uint8 array [H, W] (grey) or [H, W, 3|4] (RGB, RGBA)."""

    array: np.ndarray
    name: str = "array"  # shown in errors

    def __post_init__(self) -> None:
        a = self.array
        if a.dtype != np.uint8:
            raise DataError(f"{self.name}: image arrays must be uint8, got {a.dtype}")
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise DataError(f"{self.name}: image arrays must be [H, W] or [H, W, 3|4], got shape {list(a.shape)}")

    def image(self) -> Image.Image:
        """The pixels as a PIL image (L, RGB or RGBA), without copying through an encoder."""
        return Image.fromarray(self.array)  # L, RGB or RGBA from the shape

    def open(self) -> BinaryIO:
        """The pixels encoded as PNG (lossless), for writers that need a file's bytes."""
        buf = io.BytesIO()
        self.image().save(buf, format="PNG")
        buf.seek(0)
        return buf

    def hash(self) -> str:
        """SHA-256 of the shape, dtype and bytes."""
        h = hashlib.sha256(f"{self.array.shape}|{self.array.dtype}|".encode())
        h.update(np.ascontiguousarray(self.array).tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        """The given name."""
        return self.name

    def size(self) -> int:
        """The pixels' byte count."""
        return int(self.array.nbytes)


def as_source(image: Any, name: str = "array") -> ImageSource | None:
    """The boundary where users' values become sources: a path (str or PathLike) -> FileSource, a
    uint8 array -> ArraySource, bytes -> BytesSource, a source or None as it is; anything else is an
    error naming its type. `name` names an array or bytes in errors."""
    if image is None or isinstance(image, ImageSource):
        return image
    if isinstance(image, (str, os.PathLike)):
        return FileSource(os.fspath(image))
    if isinstance(image, np.ndarray):
        return ArraySource(image, name)
    if isinstance(image, (bytes, bytearray)):
        return BytesSource(bytes(image), name)
    raise DataError(f"{name}: an image is a file path, a uint8 array or bytes, got {type(image).__name__}")
