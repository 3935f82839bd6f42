"""The backbone protocol every method builds on.

A backbone pairs an image encoder and a text encoder whose outputs live in one joint space of
width D: global embeddings for zero-shot and adapters, spatial/token features for the
attention-based methods (VT-CLIP, CMA-CLIP, DiCLS), and the raw pooled visual features for probes.

Methods that fine-tune part of a backbone do it through `backbone.split(image_blocks, text_layers)`
(a `BackboneSplit`): a frozen trunk run once and cached, and a trainable top holding its own copies
of the upper layers, so the backbone every method shares never changes.
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
    """What an image encoder gives every method: the joint-space embedding for zero-shot and probes, spatial tokens
    for attention methods, raw pooled features for linear probes."""

    embeds: torch.Tensor  # [N, D] global embedding in the joint space (not normalised)
    tokens: torch.Tensor  # [N, P, D] spatial tokens in the joint space, row-major over `grid`
    pooled: torch.Tensor  # [N, F] raw pooled visual features (for probes)
    grid: tuple[int, int]  # (h, w) with h * w == P


@dataclass
class TextFeatures:
    """What a text encoder gives every method: the joint-space embedding, and per-token features with their mask and
    strings for token-level methods (DiCLS, iCAR)."""

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
        """texts -> TextFeatures (embeds [N, D], tokens [N, L, D], mask [N, L]), without normalising."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """{"input_ids": [N, L], "attention_mask": [N, L]} as the text encoder reads them; `max_tokens`
        truncates every text to that many tokens, keeping its end token where the tokenizer has one."""
        raise NotImplementedError

    def token_strings(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[str]]:
        """[N][L] the text of each token of `tokenize(texts, max_tokens)` ("" for padding)."""
        raise NotImplementedError

    # ---- partial fine-tuning ------------------------------------------------------------------
    def split(self, image_blocks: int | None = 0, text_layers: int | None = 0) -> BackboneSplit:
        """This backbone cut into a frozen trunk and a trainable top of the last `image_blocks`
        image blocks and `text_layers` text layers (plus each encoder's head); see BackboneSplit."""
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
        """A short hash of the weights: part of every feature cache key, so new weights never reuse old rows."""
        raise NotImplementedError

    def preprocess_config(self) -> dict[str, Any]:
        """The image preprocessing as JSON: part of the feature cache key, so a changed recipe recomputes."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_texts_normalized(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[N, D] L2-normalised global text embeddings, computed in batches."""
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(self.encode_text(list(texts[i : i + batch_size])).embeds)
        emb = torch.cat(out) if out else torch.zeros(0, self.embed_dim)
        return torch.nn.functional.normalize(emb.float(), dim=-1)


class BackboneSplit(nn.Module):
    """A backbone cut into a frozen trunk and a trainable top, for partial fine-tuning.

    End-to-end training on a few CPU cores is only affordable if the frozen part of the encoders
    is not recomputed every step. The trunk (`image_trunk`, `text_trunk`) runs the shared
    backbone's lower layers without gradients and returns the activations where the top begins;
    features/trunk.py caches them per dataset. The top (`image_top`, `text_top`) is this module:
    its parameters are its own copies of the upper layers, so training them never changes the
    backbone other methods share, and its state_dict is all a fine-tuned model has to save.
    Untrained, `image_top(image_trunk(x))` and `text_top(*text_trunk(t))` give what the backbone's
    `encode_image(x)` and `encode_text(t)` give.

    image_blocks: the last image-encoder blocks in the top; the image head (final norm, pooling,
    projection into the joint space) always is. None: no image top (`image_*` raise).
    text_layers: the same for the text encoder (final norm, pooling, projection). None: no text top.
    """

    backbone: Backbone  # the shared backbone (kept out of the sub-modules: see __init__)

    def __init__(
        self, backbone: Backbone, image_blocks: int | None, text_layers: int | None, sizes: tuple[int, int]
    ) -> None:
        """sizes: (image blocks, text layers) the backbone has."""
        super().__init__()
        from ..errors import ConfigError

        for what, k, n in (("image_blocks", image_blocks, sizes[0]), ("text_layers", text_layers, sizes[1])):
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n):
                raise ConfigError(f"{backbone.name}: {what} must be an integer in 0..{n} (or None), got {k!r}")
        self.__dict__["backbone"] = backbone  # not a sub-module: the trunk's weights are shared, never trained or saved
        self.image_blocks, self.text_layers = image_blocks, text_layers

    def config(self) -> dict[str, Any]:
        """Where the cut is: part of the trunk cache's key."""
        return {"image_blocks": self.image_blocks, "text_layers": self.text_layers}

    def _side(self, side: str) -> None:
        if (self.image_blocks if side == "image" else self.text_layers) is None:
            from ..errors import ConfigError

            what = "image_blocks" if side == "image" else "text_layers"
            raise ConfigError(f"{self.backbone.name} split has no {side} top ({what}=None)")

    # ---- images ---------------------------------------------------------------------------
    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] -> [N, ...] activations where the image top begins (no gradients)."""
        self._side("image")
        with torch.no_grad():
            return self._image_trunk(pixels)

    def image_top(self, acts: torch.Tensor) -> ImageFeatures:
        """Trunk activations -> ImageFeatures (embeds, tokens, pooled, grid), with gradients."""
        self._side("image")
        return self._image_top(acts)

    # ---- texts ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """The shared backbone's tokenizer (the split has no tokenizer of its own)."""
        return self.backbone.tokenize(texts, max_tokens)

    def token_strings(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[str]]:
        """The shared backbone's token strings, aligned with `tokenize`."""
        return self.backbone.token_strings(texts, max_tokens)

    def text_trunk(self, texts: Sequence[str], max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (hidden [N, L, H] where the text top begins, mask [N, L] bool: real tokens)."""
        self._side("text")
        with torch.no_grad():
            return self._text_trunk(self.tokenize(texts, max_tokens))

    def text_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        """(hidden [N, L, H], mask [N, L]) -> TextFeatures (embeds [N, D], tokens [N, L, D], mask), with
        gradients. Rows may carry extra padding (mask False): it changes nothing."""
        self._side("text")
        return self._text_top(hidden, mask.bool())

    # ---- what each backbone implements ----------------------------------------------------------
    def _image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _image_top(self, acts: torch.Tensor) -> ImageFeatures:
        raise NotImplementedError

    def _text_trunk(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _text_top(self, hidden: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        raise NotImplementedError


def copy_module(module: nn.Module) -> nn.Module:
    """A split's own trainable copy of one layer of a frozen backbone."""
    import copy

    out = copy.deepcopy(module)
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def first_output(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A transformer layer's hidden states, whether it returns them alone or first in a tuple
    (transformers 5 and 4 respectively)."""
    return out[0] if isinstance(out, tuple) else out


def last_real(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [N, L, H], mask [N, L] -> [N, H] at each row's last real token: CLIP's end-of-text
    pooling (the EOT token ends every right-padded CLIP tokenization)."""
    idx = mask.long().sum(1).clamp_min(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


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
