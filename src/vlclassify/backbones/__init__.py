"""Backbones: pretrained image + text encoders that share one joint space."""
from .base import Backbone, ImageFeatures, TextFeatures
from .registry import BACKBONES, create_backbone, list_backbones, register_backbone
from . import effnet_minilm, hf_clip, open_clip, toy  # noqa: F401  (registration)

__all__ = [
    "Backbone", "ImageFeatures", "TextFeatures", "BACKBONES", "create_backbone", "list_backbones",
    "register_backbone",
]
