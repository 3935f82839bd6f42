"""Zero-shot: class names (and descriptions) in prompt templates, nearest class text by cosine.

Nothing is learned from images. Validation data, when given, only chooses the decision rule:
multi-label thresholds, or the per-class thresholds of a target precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError
from ..trust.model import Trust
from .base import MAIN, MULTI, SINGLE, TEXT, Encoded, Method, normalize
from .registry import register_method
from .tags import Tags
from .templates import resolve_templates


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot options: templates and which modality is scored."""

    templates: str | list[str] = "single"  # single | select7 | imagenet80 | a dataset name | list of "{}" templates
    modality: str = "image"  # image | text | both: score the image, the item's paired text, or their sum
    text_weight: float = 1.0  # weight of the paired-text score when modality == "both"

    def __post_init__(self) -> None:
        if self.modality not in ("image", "text", "both"):
            raise ConfigError(f"zero-shot: modality must be image, text or both, got {self.modality!r}")


class ZeroShotHead(nn.Module):
    """Cosine similarity to fixed class text embeddings, on the image and/or its paired text.

    batch {"image": [B, D], "text": [B, D]} -> {"logits": [B, C]}."""

    class_embeds: torch.Tensor  # [C, D] buffer

    def __init__(self, num_classes: int, dim: int, scale: float, modality: str, text_weight: float) -> None:
        super().__init__()
        self.scale, self.modality, self.text_weight = scale, modality, text_weight
        self.register_buffer("class_embeds", torch.zeros(num_classes, dim))  # [C, D] normalised

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {image, text [B, D]} -> cosine logits [B, C] against the class texts."""
        w = self.class_embeds.T
        if self.modality == "image":
            return {"logits": self.scale * normalize(batch["image"]) @ w}
        txt = self.scale * normalize(batch["text"]) @ w  # empty texts are zero rows: no vote
        if self.modality == "text":
            return {"logits": txt}
        return {"logits": self.scale * normalize(batch["image"]) @ w + self.text_weight * txt}


@register_method
class ZeroShot(Method):
    """Zero-shot CLIP-style classification with template ensembles (no training)."""

    name = "zero-shot"
    # CLIP-style scores are relative: softmax also for multi-label data
    tags = Tags(update=True, onnx=True, names_only=True, activation="softmax")
    Config = ZeroShotConfig
    kinds = frozenset({SINGLE, MULTI})
    optional_kinds = frozenset({TEXT})  # modality="text" | "both": scores the image's paired text too
    trains_on_images = False
    needs_every_class = False  # classes by name
    state = ("descriptions",)

    def __init__(self, backbone, **options) -> None:
        super().__init__(backbone, **options)
        self.templates = resolve_templates(self.config.templates)
        self.descriptions: dict[str, str] = {}

    def takes(self) -> frozenset[str]:
        return self.kinds | ({TEXT} if self.config.modality != "image" else set())

    def feature_needs(self) -> frozenset[str]:
        return frozenset({"image": {"image"}, "text": {"text"}, "both": {"image", "text"}}[self.config.modality])

    def build_head(self, spec: dict[str, Any]) -> nn.Module:
        c = self.config
        return ZeroShotHead(
            spec["num_classes"], spec["dim"], float(self.backbone.logit_scale), c.modality, c.text_weight
        )

    def set_classes(self, classnames: list[str], descriptions: dict[str, str] | None = None) -> ZeroShot:
        """Zero-shot needs no images: set (or change) the classes by name (and description)."""
        if len(classnames) < 2:
            raise ConfigError(f"zero-shot: need at least 2 classes, got {list(classnames)}")
        if list(classnames) != self.classnames:
            self.class_text = None  # the data's class texts were for the old classes
        self.classnames = list(classnames)
        self.task_classes = {MAIN: list(classnames)}
        self.descriptions = dict(descriptions or {})
        emb = self.class_texts(self.templates, self.descriptions)[1]
        head = cast(ZeroShotHead, self.init_head({"num_classes": len(classnames), "dim": emb.shape[1]}))
        head.class_embeds.copy_(emb)
        self.decisions, self.trust = {}, Trust()  # rules chosen for other classes do not apply
        return self

    def fit_head(self, train: Encoded, val: Encoded | None) -> None:
        self.set_classes(self.classnames, self.descriptions)
        self.fit_info = {"templates": len(self.templates)}

    def _update(self, train, val, classes, descriptions):
        self.set_classes(classes, {**self.descriptions, **descriptions})
        return "classes added by name (zero-shot learns nothing from images)"
