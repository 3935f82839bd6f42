"""Methods: one file per method, registered by name when this package is imported."""

import importlib
import pkgutil

from .base import Encoded, Method, load_method
from .registry import METHODS, create_method, list_methods, register_method

_SUPPORT = {"base", "decision", "registry", "tags", "templates"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _SUPPORT and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")  # each method module registers itself

__all__ = ["Encoded", "Method", "METHODS", "create_method", "list_methods", "load_method", "register_method"]
