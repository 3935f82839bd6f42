"""Image decoding with errors that name the file."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFile

from ..errors import DataError
from .items import Item

ImageFile.LOAD_TRUNCATED_IMAGES = False


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are pasted onto `background` (Tux Paint stamps)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def load_image(item: Item | str | np.ndarray) -> Image.Image:
    from .webdataset import decode_image, describe, parse_member_ref, read_member

    src = item.image if isinstance(item, Item) else item
    if src is None:
        raise DataError(f"{getattr(item, 'key', '?')}: item has no image")
    if isinstance(src, np.ndarray):
        arr = src
        if arr.dtype != np.uint8:
            raise DataError(f"{getattr(item, 'key', 'array')}: image arrays must be uint8, got {arr.dtype}")
        if arr.ndim == 2:
            return Image.fromarray(arr, "L").convert("RGB")
        return to_rgb(Image.fromarray(arr))
    if parse_member_ref(src):  # an image inside a WebDataset tar
        return decode_image(read_member(src), describe(src))
    try:
        with Image.open(src) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"{src}: image file not found") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"{src}: cannot read image ({type(e).__name__}: {e})") from None
