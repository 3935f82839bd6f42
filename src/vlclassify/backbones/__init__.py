"""Backbones: pretrained image + text encoders that share one joint space."""

from . import effnet_minilm, hf_clip, open_clip, toy  # noqa: F401  (registration)
from .base import Backbone, ImageFeatures, TextFeatures
from .registry import BACKBONES, create_backbone, list_backbones, register_backbone

__all__ = [
    "Backbone",
    "ImageFeatures",
    "TextFeatures",
    "BACKBONES",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]
