"""The backbone protocol every method builds on.

A backbone pairs an image encoder and a text encoder whose outputs live in one joint space of
width D: global embeddings for zero-shot and adapters, spatial/token features for the
attention-based methods (VT-CLIP, CMA-CLIP, DiCLS), and the raw pooled visual features for probes.
`backbone.bridge()` is the linear map from the pooled features into the joint space (exact for
CLIP, fitted for the ConSE join): joint-space methods train a copy of it on the pooled features.

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

    # ---- the bridge from pooled features to the joint space -------------------------------------
    def bridge(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [D, F], b [D]) with `embeds ≈ pooled @ W.T + b`: a linear map from the pooled visual
        features into the joint space. Methods that work in the joint space start a trainable copy
        of it there, so they begin at the backbone's own zero-shot and can still recover what the
        joint embedding dropped from the pooled features. Exact where the embedding is a linear
        function of the pooled features (CLIP's visual projection); fitted where it is not
        (effnet-minilm's ConSE join). Fresh tensors: callers may change them."""
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

    def pixel_recipe(self) -> dict[str, Any] | None:
        """The numpy recipe (pixels.py) that `preprocess` is, for the ONNX predict path; None when
        `preprocess` is something else (then an exported model predicts with torch)."""
        return None

    def weight_files(self) -> list[str]:
        """The files the weights are read from: an ONNX export records their fingerprints, so the
        predict path sees new weights (a re-export) without building the backbone."""
        return []

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


def hf_token_strings(tokenizer: Any, batch: dict[str, torch.Tensor]) -> list[list[str]]:
    """Each text's token strings from a Hugging Face tokenizer's batch, '' at padding: what
    `explain` labels a text's attention with."""
    return [
        [t if real else "" for t, real in zip(tokenizer.convert_ids_to_tokens(ids), m)]
        for ids, m in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
    ]


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


RIDGE_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 10.0)  # ridge strengths, in units of the mean feature variance


def ridge_bridge(
    pooled: torch.Tensor, embeds: torch.Tensor, groups: Sequence[int], folds: int = 5
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Fit (W [D, F], b [D]) with embeds ≈ pooled @ W.T + b by ridge regression, for a backbone
    whose joint embedding is not a linear function of its pooled features.

    The ridge strength is chosen by grouped cross-validation: rows of one group (the crops of one
    photo) are held out together, and the strength whose held-out predictions have the highest
    mean cosine to the true embeddings wins (methods compare normalised embeddings, so the cosine
    is what the bridge must keep; a photo's crops are near-duplicates, so holding out single
    crops would reward fitting noise). Strengths are relative to the mean feature variance,
    lam * tr(XᵀX) / F, so one grid serves any feature scale. -> (W, b, a JSON record of the search).
    """
    x, y = pooled.double(), embeds.double()  # [M, F], [M, D]
    g = np.asarray(groups)
    uniq = np.unique(g)
    k = min(folds, len(uniq))
    if k < 2:
        raise ValueError(f"ridge_bridge: need photos from at least 2 groups, got {len(uniq)}")
    fold_of = {int(u): i % k for i, u in enumerate(uniq)}
    fold = torch.as_tensor([fold_of[int(v)] for v in g])

    def solve(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centred normal equations, eigen-decomposed once: (eigvals [F], eigvecs [F, F], Vᵀ Xᵀ Y [F, D])."""
        evals, evecs = torch.linalg.eigh(xs.T @ xs)
        return evals.clamp_min(0), evecs, evecs.T @ (xs.T @ ys)

    def weights(sol: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lam: float) -> torch.Tensor:
        evals, evecs, vty = sol
        return evecs @ (vty / (evals + lam * float(evals.sum()) / len(evals))[:, None])  # [F, D]

    scores = {lam: 0.0 for lam in RIDGE_GRID}
    for f in range(k):
        tr, te = fold != f, fold == f
        mx, my = x[tr].mean(0), y[tr].mean(0)
        sol = solve(x[tr] - mx, y[tr] - my)
        for lam in RIDGE_GRID:
            pred = (x[te] - mx) @ weights(sol, lam) + my
            scores[lam] += float(torch.nn.functional.cosine_similarity(pred, y[te], dim=-1).sum()) / len(g)
    best = max(RIDGE_GRID, key=lambda lam: scores[lam])
    mx, my = x.mean(0), y.mean(0)
    w = weights(solve(x - mx, y - my), best)  # [F, D]
    b = my - mx @ w
    fit_cos = float(torch.nn.functional.cosine_similarity(x @ w + b, y, dim=-1).mean())
    info = {
        "ridge": best,
        "cv_folds": k,
        "cv_mean_cosine": {f"{lam:g}": round(s, 5) for lam, s in scores.items()},
        "fit_mean_cosine": round(fit_cos, 5),
        "rows": len(g),
        "groups": len(uniq),
    }
    return w.T.float().contiguous(), b.float(), info


class BridgeLayer(nn.Module):
    """pooled [B, F] -> [B, D] in the joint space: a trainable copy of a backbone's bridge.

    W = W0 + s * dW and b = b0 + db, with (W0, b0) the backbone's bridge (buffers) and dW, db the
    trained parameters, initialised at 0 so a head starts at the backbone's own zero-shot. s is
    the RMS of W0: an optimizer step then changes W by the same fraction of its size on any
    backbone (CLIP's projection and a ridge fit differ ~30x in scale), and weight decay pulls
    towards the bridge rather than towards 0. `trainable=False` keeps the bridge fixed.
    """

    w0: torch.Tensor
    b0: torch.Tensor
    step: torch.Tensor

    def __init__(self, pooled_dim: int, dim: int, trainable: bool = True) -> None:
        super().__init__()
        self.register_buffer("w0", torch.zeros(dim, pooled_dim))  # [D, F]
        self.register_buffer("b0", torch.zeros(dim))  # [D]
        self.register_buffer("step", torch.ones(()))  # s, the RMS of w0
        self.dw = nn.Parameter(torch.zeros(dim, pooled_dim)) if trainable else None  # [D, F]
        self.db = nn.Parameter(torch.zeros(dim)) if trainable else None  # [D]

    @torch.no_grad()
    def reset(self, backbone: Backbone) -> BridgeLayer:
        """Start at `backbone`'s bridge; an error names a width that does not fit."""
        from ..errors import ConfigError

        w, b = backbone.bridge()
        if tuple(w.shape) != tuple(self.w0.shape):
            raise ConfigError(
                f"{backbone.name}: its bridge maps {w.shape[1]}-d pooled features to {w.shape[0]}-d, "
                f"but the head was built for {self.w0.shape[1]}-d -> {self.w0.shape[0]}-d"
            )
        self.w0.copy_(w)
        self.b0.copy_(b)
        self.step.fill_(float(w.pow(2).mean().sqrt()) or 1.0)
        for p in (self.dw, self.db):
            if p is not None:
                p.zero_()
        return self

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, F] -> [B, D] through the bridge plus its trained change."""
        w, b = self.w0, self.b0
        if self.dw is not None and self.db is not None:
            w, b = w + self.step * self.dw, b + self.db
        return pooled.float() @ w.T + b
