"""Method registry: `list_methods()` and `create_method(name, backbone, **options)`."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..registry import Registry

METHODS: Registry = Registry("method")


def register_method(cls):
    """Class decorator: registers a Method subclass under its `name`."""
    doc = next(iter((cls.__doc__ or "").strip().splitlines()), "")
    METHODS.register(cls.name, doc)(cls)
    return cls


def list_methods() -> list[str]:
    return METHODS.names()


def create_method(name: str, backbone=None, **options: Any):
    """Build a method by name; `backbone` defaults to the offline `effnet-minilm`."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    if backbone is None:
        from ..backbones import create_backbone

        backbone = create_backbone("effnet-minilm")
    return METHODS.get(name)(backbone, **options)
