"""Image decoding to 8-bit RGB, with errors that name the manifest row and the file.

Every PIL mode is handled: 8-bit modes are converted by PIL; transparency (an alpha channel,
premultiplied or not, or a `transparency` colour key) is pasted onto white; 16/32-bit integer
images (`I;16*`, `I`) are scaled from 0..65535 to 0..255 (an `I` image with values outside
0..65535 is min-max scaled); float images (`F`) in 0..1 are scaled by 255, in 0..255 kept, and
otherwise min-max scaled. A mode PIL adds later is refused by name.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFile

from ..errors import DataError
from .items import Item

ImageFile.LOAD_TRUNCATED_IMAGES = False

CONVERTIBLE = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}  # PIL converts these to RGB itself
WITH_ALPHA = {"LA", "PA", "RGBA", "RGBa"}  # PIL converts these to RGBA itself
HIGH_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # scaled to 8 bits here


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
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


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
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if mode in WITH_ALPHA or (mode in CONVERTIBLE and "transparency" in image.info):
        return _paste_on(image.convert("RGBA"), background)
    if mode in CONVERTIBLE:
        return image.convert("RGB")
    if mode in HIGH_DEPTH:
        return _to_8bit(image).convert("RGB")
    supported = ", ".join(sorted(CONVERTIBLE | WITH_ALPHA | HIGH_DEPTH | {"La"}))
    raise DataError(f"image mode {mode!r} is not supported (supported: {supported})")


def load_image(item: Item | str | np.ndarray) -> Image.Image:
    """Decode to RGB. Errors start with the item's origin (its manifest row) when it has one:
    `labels.csv:17: photos/x.jpg: cannot read image (...)`."""
    from .webdataset import decode_image, describe, parse_member_ref, read_member

    src = item.image if isinstance(item, Item) else item
    origin = item.origin if isinstance(item, Item) else ""
    name = src if isinstance(src, str) else getattr(item, "key", "") or "array"
    prefix = f"{origin}: " if origin and origin != name else ""
    if src is None:
        raise DataError(f"{prefix}{getattr(item, 'key', '?')}: item has no image")
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8:
            raise DataError(f"{prefix}{name}: image arrays must be uint8, got {src.dtype}")
        if src.ndim == 2:
            return Image.fromarray(src, "L").convert("RGB")
        return to_rgb(Image.fromarray(src))
    if parse_member_ref(src):  # an image inside a WebDataset tar
        return decode_image(read_member(src), describe(src))
    try:
        with Image.open(src) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"{prefix}{src}: image file not found") from None
    except DataError as e:
        raise DataError(f"{prefix}{src}: {e}") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"{prefix}{src}: cannot read image ({type(e).__name__}: {e})") from None
