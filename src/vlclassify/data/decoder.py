"""The one image decoder: any image source -> 8-bit RGB, as a viewer shows it, at about the size used.

`decode` is what the loaders' extraction path, WebDataset, `predict`/`eval`, export and the
service call. In order:

1. **Limits, from the header** (nothing is decoded yet): more than `max_pixels` pixels (a
   decompression bomb) or an aspect ratio beyond `max_aspect` (a 30000 x 4 PNG would be resized to
   1,680,000 x 224 before the centre crop) is refused with `TooLarge`, one line naming the image.
2. **JPEG draft**: with `size` (the model's input side) and a JPEG whose short side is at least
   8 x size, libjpeg decodes at 1/2, 1/4 or 1/8 scale, keeping the short side >= 4 x size.
3. **EXIF orientation** (`ImageOps.exif_transpose`): a phone photo stored sideways with its
   Orientation tag is classified upright, as every viewer shows it.
4. **Modes to RGB** (`to_rgb`): 8-bit modes (1, L, P, CMYK, YCbCr, LAB, HSV) are converted by PIL;
   transparency (an alpha channel, premultiplied or not, or a `transparency` colour key) is pasted
   onto white; 16/32-bit integer images (`I;16*`, `I`) are scaled from 0..65535 to 0..255 (an `I`
   image with values outside 0..65535 is min-max scaled); float images (`F`) in 0..1 are scaled by
   255, in 0..255 kept, otherwise min-max scaled. A mode PIL adds later is refused by name.
5. **Reduce**: with `size`, an image whose short side is still at least 8 x size is box-averaged by
   the integer factor that keeps its short side >= 4 x size (`Image.reduce`), so a decoded image
   costs a few times its model input, never its file's full size. RGB and grey images are reduced
   before step 4, so only the decode itself is full size: a 6300 x 6300 PNG uploaded as bytes
   (size 224, as the service decodes it) peaks at +157 MB and is held as 900 x 900 (2.4 MB)
   (`python benchmarks/speed/decode_reduction.py --memory`); the decoder before this one (commit
   e4c4e5b, the same measurement) peaked at +530 MB and held 6300 x 6300 (119 MB).
   Applied to its own output, step 5 changes nothing: the service decodes an upload once and
   extraction decodes that array again without a second reduction, so the service and offline
   `predict` see the same pixels.

Formats: every one Pillow reads (`IMAGE_EXTS`: JPEG with `.jfif`/`.jpe`, PNG, WebP, AVIF, TIFF,
GIF, BMP, ...), HEIC/HEIF through the optional pillow-heif plugin (`HEIF`; without it a HEIC file
is refused by name), not the ones Pillow only identifies (`NOT_READ`: EPS needs Ghostscript, MPEG
is video, ...).

Where no reduction applies (short side < 8 x size, or no `size`) the pixels are exactly those of a
plain full decode. What a reduction approximates is the backbones' preprocessing (short side
resized to the input side with an antialiased bicubic filter, then a centre crop). On the 30
`mate-backgrounds` images (`python benchmarks/speed/decode_reduction.py`, effnet-minilm, size
224) the 3 that are reduced (JPEGs of 3840 x 2160, 5640 x 3172 and 2560 x 1920, each by draft)
move the model input [3, 224, 224] in 0..1 by at most 0.0118 (3/255), 0.00067 on average, and
their embeddings keep a cosine similarity >= 0.99936 with the full decode's; the other 27 are
identical. Keeping only 2 x size moved the input by up to 0.22 (a 5640 x 3172 photo), hence 4.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import DataError
from .items import Item
from .source import ArraySource, ImageSource, as_source

ImageFile.LOAD_TRUNCATED_IMAGES = False


def _register_heif() -> bool:
    """HEIC/HEIF (phone photos) through the optional pillow-heif plugin (`pip install 'vlclassify[heic]'`)."""
    try:
        from pillow_heif import register_heif_opener  # an optional dependency, not a circle
    except ImportError:
        return False
    register_heif_opener()
    return True


HEIF = _register_heif()
HEIF_EXTS = frozenset({".heic", ".heics", ".heif", ".heifs", ".hif"})
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")
HEIF_REFUSAL = "HEIC/HEIF images need the optional pillow-heif package: pip install 'vlclassify[heic]'"
# Pillow formats it only identifies (the pixels need a program or handler it does not have) or that
# are not pictures: a file of these is not an image to classify
NOT_READ = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS"})
Image.init()
IMAGE_EXTS = frozenset(
    e for e, f in Image.registered_extensions().items() if f in Image.OPEN and f not in NOT_READ and e not in HEIF_EXTS
)  # HEIF_EXTS are images when HEIF

MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)  # PIL's own decompression-bomb error limit
MAX_ASPECT = 100.0  # long side / short side: resized to 224, a 100:1 strip is 22400 x 224 (5 M pixels, 15 MB)
REDUCE_FROM = 8  # reduce when the short side is >= REDUCE_FROM * size ...
KEEP = 4  # ... to a short side >= KEEP * size (the module docstring says why 4)

CONVERTIBLE = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}  # PIL converts these to RGB itself
WITH_ALPHA = {"LA", "PA", "RGBA", "RGBa"}  # PIL converts these to RGBA itself
HIGH_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # scaled to 8 bits here


class TooLarge(DataError):
    """An image refused from its header before decoding: over the pixel limit or the aspect limit
    (the service answers 413)."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """A one-channel 16/32-bit integer or float image -> mode L (see the module docstring)."""
    a = np.asarray(image).astype(np.float64)  # [H, W]
    if not np.isfinite(a).all():
        raise DataError(f"image mode {image.mode!r} has NaN or infinite pixel values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if image.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif image.mode == "F" and lo >= 0 and hi <= 255:
        pass
    elif image.mode != "F" and lo >= 0 and hi <= 65535:
        a = a / 257.0  # 65535 -> 255 exactly
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _paste_on(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparent pixels are pasted onto `background` (Tux Paint stamps)."""
    mode = image.mode
    if mode == "La":  # premultiplied grey + alpha: over a background b, out = L + (1 - a) * b
        lum, alpha = (np.asarray(ch, dtype=np.float64) for ch in image.split())
        rgb = np.stack([lum + (255.0 - alpha) * (b / 255.0) for b in background], axis=-1)
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    if mode in WITH_ALPHA or (mode in CONVERTIBLE and "transparency" in image.info):
        return _paste_on(image.convert("RGBA"), background)
    if mode in CONVERTIBLE:
        return image.convert("RGB")
    if mode in HIGH_DEPTH:
        return _to_8bit(image).convert("RGB")
    supported = ", ".join(sorted(CONVERTIBLE | WITH_ALPHA | HIGH_DEPTH | {"La"}))
    raise DataError(f"image mode {mode!r} is not supported (supported: {supported})")


def _check_limits(w: int, h: int, max_pixels: int, max_aspect: float) -> None:
    if w * h > max_pixels:
        raise TooLarge(f"{w} x {h} = {w * h} pixels, over the limit of {max_pixels}")
    if max(w, h) > max_aspect * max(1, min(w, h)):
        ratio = max(w, h) / max(1, min(w, h))
        raise TooLarge(f"{w} x {h}: aspect ratio {ratio:.0f}:1, over the limit of {max_aspect:g}:1")


def _reduced(image: Image.Image, size: int | None) -> Image.Image:
    """Box-average by the integer factor keeping the short side >= KEEP * size (step 5)."""
    k = min(image.size) // (KEEP * size) if size else 0
    return image.reduce(k) if k >= REDUCE_FROM // KEEP else image


def _decode_stream(f: BinaryIO, size: int | None, max_pixels: int, max_aspect: float) -> Image.Image:
    try:
        im = Image.open(f)
    except Image.DecompressionBombError as e:
        raise TooLarge(str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for what is not an image
        f.seek(0)
        head = f.read(12)  # ISO base media: size, "ftyp", the major brand
        if not HEIF and head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
            raise DataError(HEIF_REFUSAL) from None
        raise DataError(f"cannot read image ({type(e).__name__}: {e})") from None
    with im:
        _check_limits(*im.size, max_pixels, max_aspect)
        if size and im.format == "JPEG" and min(im.size) >= REDUCE_FROM * size:
            im.draft(im.mode, (KEEP * size, KEEP * size))  # libjpeg's DCT scaling: 1/2, 1/4 or 1/8
        try:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            # RGB and L: reducing before the conversion gives the same pixels without a second full-size copy
            return to_rgb(_reduced(im, size) if im.mode in ("RGB", "L") else im)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data
            raise DataError(f"cannot read image ({type(e).__name__}: {e})") from None


def decode(
    src: Item | ImageSource | str | os.PathLike[str] | np.ndarray | bytes,
    *,
    size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    max_aspect: float = MAX_ASPECT,
) -> Image.Image:
    """An image -> 8-bit RGB PIL image, oriented by EXIF, reduced towards `size` (see the module
    docstring). `size` is the model's input side (`backbone.image_size`); None decodes at full size.

    Errors are one line naming the image, after the item's manifest row when it has one:
    `labels.csv:17: photos/x.jpg: cannot read image (...)`; `TooLarge` for the limits."""
    origin = ""
    if isinstance(src, Item):
        if src.image is None:
            raise DataError(f"{src.origin or src.key or '?'}: item has no image")
        origin, src = src.origin, src.image
    source = as_source(src)
    if source is None:
        raise DataError("no image given")
    name = source.describe()
    prefix = f"{origin}: " if origin and origin != name else ""
    try:
        if isinstance(source, ArraySource):
            pixels = source.image()
            _check_limits(*pixels.size, max_pixels, max_aspect)
            out = to_rgb(pixels)
        elif source.size() == 0:
            raise DataError("empty image (0 bytes)")
        else:
            with source.open() as f:
                out = _decode_stream(f, size, max_pixels, max_aspect)
        return _reduced(out, size)
    except DataError as e:
        msg = str(e)
        where = prefix + ("" if msg.startswith(name) else f"{name}: ")
        raise type(e)(f"{where}{msg}") from None
