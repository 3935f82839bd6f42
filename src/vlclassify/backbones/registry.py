"""Backbone registry: `list_backbones()` and `create_backbone(name, **options)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..registry import Registry
from .base import Backbone

BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")  # name -> factory(**options)
register_backbone = BACKBONES.register


def list_backbones() -> list[str]:
    """The registered backbone names, for `create_backbone` and `vlclassify backbones`."""
    return BACKBONES.names()


def create_backbone(name: str = "effnet-minilm", **options: Any) -> Backbone:
    """Build a backbone by registry name; options are the backbone's own keyword arguments."""
    from ..errors import ConfigError

    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    try:
        return BACKBONES.get(name)(**options)
    except TypeError as e:
        raise ConfigError(f"backbone {name!r}: {e}") from None
