"""Drawing helpers: an attention / relevance map as a heatmap over its image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..utils import atomic_path


def heatmap_overlay(image: Image.Image, heat: np.ndarray, opacity: float = 0.5, cmap: str = "jet") -> Image.Image:
    """image + heat [h, w] (any range; min-max scaled, bilinearly upsampled) -> RGB image of the same size."""
    import matplotlib

    heat = np.asarray(heat, dtype=np.float64)
    if heat.ndim != 2 or not heat.size:
        raise DataError(f"heatmap must be 2-d [h, w], got shape {heat.shape}")
    if not np.isfinite(heat).all():
        raise DataError("heatmap has NaN or infinite values")
    lo, hi = heat.min(), heat.max()
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    base = image.convert("RGB")
    small = Image.fromarray((norm * 255).astype(np.uint8), mode="L")
    big = np.asarray(small.resize(base.size, Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    colored = (matplotlib.colormaps[cmap](big)[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(colored), opacity)


def save_heatmap(
    image: Image.Image,
    heat: np.ndarray,
    out: str | Path,
    title: str | None = None,
    opacity: float = 0.5,
    min_size: int = 224,
) -> Path:
    """Write the overlay as a PNG (upscaled to at least `min_size` px so small images stay readable)."""
    over = heatmap_overlay(image, heat, opacity)
    if min(over.size) < min_size:
        k = min_size / min(over.size)
        over = over.resize((round(over.size[0] * k), round(over.size[1] * k)), Image.Resampling.NEAREST)
    if title:
        from PIL import ImageDraw

        canvas = Image.new("RGB", (over.size[0], over.size[1] + 18), "white")
        canvas.paste(over, (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
        over = canvas
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        over.save(tmp, format="PNG")
    return out
