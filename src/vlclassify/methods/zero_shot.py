"""Zero-shot: class names in prompt templates, nearest class text by cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Encoded, Method, normalize
from .registry import register_method
from .templates import class_text_embeddings, resolve_templates


@dataclass
class ZeroShotConfig:
    templates: str | list[str] = "single"  # single | select7 | imagenet80 | a dataset name | list of "{}" templates
    modality: str = "image"  # image | text | both: score the image, the item's paired text, or their sum
    text_weight: float = 1.0  # weight of the paired-text score when modality == "both"


@register_method
class ZeroShot(Method):
    """Zero-shot CLIP-style classification with template ensembles (no training)."""

    name = "zero-shot"
    Config = ZeroShotConfig

    def __init__(self, backbone, cache=None, **options) -> None:
        super().__init__(backbone, cache, **options)
        if self.config.modality not in ("image", "text", "both"):
            raise ConfigError(f"zero-shot: modality must be image, text or both, got {self.config.modality!r}")
        self.templates = resolve_templates(self.config.templates)
        self.class_embeds: torch.Tensor | None = None  # [C, D]

    def requires_all_classes(self) -> bool:
        return False  # zero-shot needs names, not images

    def set_classes(self, classnames: list[str]) -> ZeroShot:
        """Zero-shot needs no images: set (or change) the classes by name."""
        self.classnames = list(classnames)
        with torch.inference_mode():
            self.class_embeds = class_text_embeddings(self.backbone, self.classnames, self.templates, cache=self.cache)
        return self

    def fit(self, train, val=None) -> ZeroShot:
        """Only the class names of `train` are used: nothing is learned from its images."""
        ds = train.dataset if isinstance(train, Encoded) else train
        if ds.num_classes < 2:
            raise ConfigError(f"{ds.name}: need at least 2 classes, got {ds.num_classes}")
        return self.set_classes(ds.classnames)

    def _logits(self, data: Encoded) -> torch.Tensor:
        f = data.features
        scale = self.backbone.logit_scale
        img = scale * normalize(f.image) @ self.class_embeds.T
        if self.config.modality == "image":
            return img
        if f.text is None:
            raise ConfigError("zero-shot: modality needs paired texts, but the items have none")
        txt = scale * normalize(f.text) @ self.class_embeds.T
        return txt if self.config.modality == "text" else img + self.config.text_weight * txt

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"class_embeds": self.class_embeds}

    def load_tensors(self, tensors) -> None:
        self.class_embeds = tensors["class_embeds"]
