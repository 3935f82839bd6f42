"""Image -> pixel array preprocessing in PIL + numpy: the recipes backbones declare (`pixel_recipe`).

One implementation for both sides: a backbone's `preprocess` calls `recipe_pixels` with its own
recipe, and the ONNX predict path (onnx_predict.py) calls it with the recipe recorded in the
export's sidecar, without importing torch. Pure PIL + numpy also keeps decode threads from
starting torch's intra-op thread pool, which costs ~10 ms per small op when the cores are busy.

    recipe: {"size": S, "range": [lo, hi]}  short side resized to S (bicubic), centre crop S x S,
            values 0..255 mapped linearly onto lo..hi -> [3, S, S] float32, RGB, NCHW order
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def unit_array(image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """Resize the short side to `size`, centre-crop to size x size -> [3, size, size] float32 in [0, 1]."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1), dtype=np.float32)
    arr /= np.float32(255.0)
    return arr


def recipe_pixels(image: Image.Image, recipe: dict[str, Any]) -> np.ndarray:
    """An RGB image -> [3, S, S] float32 by `recipe` (see the module doc)."""
    arr = unit_array(image, int(recipe["size"]))
    lo, hi = (float(v) for v in recipe["range"])
    if (lo, hi) != (0.0, 1.0):
        arr *= np.float32(hi - lo)
        arr += np.float32(lo)
    return arr
