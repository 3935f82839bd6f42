"""The backbone protocol every method builds on.

A backbone pairs an image encoder and a text encoder whose outputs live in one joint space of
width D: global embeddings for zero-shot and adapters, spatial/token features for the
attention-based methods (VT-CLIP, CMA-CLIP, DiCLS), and the raw pooled visual features for probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn


@dataclass
class ImageFeatures:
    embeds: torch.Tensor  # [N, D] global embedding in the joint space (not normalised)
    tokens: torch.Tensor  # [N, P, D] spatial tokens in the joint space, row-major over `grid`
    pooled: torch.Tensor  # [N, F] raw pooled visual features (for probes)
    grid: tuple[int, int]  # (h, w) with h * w == P


@dataclass
class TextFeatures:
    embeds: torch.Tensor  # [N, D] global embedding in the joint space (not normalised)
    tokens: torch.Tensor  # [N, L, D] token features in the joint space
    mask: torch.Tensor  # [N, L] bool, True for real tokens
    token_strings: list[list[str]] = field(default_factory=list)  # [N][L] the tokens' text


class Backbone(nn.Module):
    """Base class; subclasses set the attributes below and implement the encoders."""

    name: str = ""
    embed_dim: int = 0  # D, the joint space
    pooled_dim: int = 0  # F, raw pooled visual features
    image_size: int = 224

    def __init__(self) -> None:
        super().__init__()
        self.options: dict[str, Any] = {}

    # ---- images -------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> [3, H, W] float tensor ready for `encode_image`."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """pixels [N, 3, H, W] -> ImageFeatures."""
        raise NotImplementedError

    # ---- texts --------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> TextFeatures:
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenizer output for `encode_text_tokens` (trainable methods batch texts themselves)."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        """1/temperature used to turn cosine similarities into zero-shot logits."""
        return float(self.options.get("logit_scale", 100.0))

    # ---- identity -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Name + options: enough for `create_backbone(**config)` to rebuild it elsewhere."""
        return {"name": self.name, **self.options}

    def identity(self) -> dict[str, Any]:
        """Config plus a fingerprint of the weights: the feature cache's backbone key.

        `logit_scale` only scales zero-shot logits, never features, so it is not part of the key."""
        cfg = {k: v for k, v in self.config().items() if k != "logit_scale"}
        return {**cfg, "weights": self.weights_fingerprint()}

    def weights_fingerprint(self) -> str:
        raise NotImplementedError

    def preprocess_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def encode_texts_normalized(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[N, D] L2-normalised global text embeddings, computed in batches."""
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(self.encode_text(list(texts[i : i + batch_size])).embeds)
        emb = torch.cat(out) if out else torch.zeros(0, self.embed_dim)
        return torch.nn.functional.normalize(emb.float(), dim=-1)


def pil_to_unit_array(
    image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> np.ndarray:
    """Resize the short side to `size`, centre-crop to size x size -> [3, size, size] float32 in [0, 1].

    Pure PIL + numpy on purpose: decode threads then never start torch's intra-op thread pool,
    which costs ~10 ms per small op when the cores are busy with the model.
    """
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1), dtype=np.float32)
    arr /= np.float32(255.0)
    return arr


def pil_to_unit_tensor(
    image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> torch.Tensor:
    """`pil_to_unit_array` as a tensor: [3, size, size] in [0, 1]."""
    return torch.from_numpy(pil_to_unit_array(image, size, resample))


def quiet_from_pretrained(cls: Any, path: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` without transformers' per-load progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(path, **kwargs)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
