"""Methods: one file per method, registered by name."""
from .base import Encoded, Method, load_method
from .registry import METHODS, create_method, list_methods, register_method
from . import zero_shot, linear_probe  # noqa: F401  (registration)

__all__ = ["Encoded", "Method", "METHODS", "create_method", "list_methods", "load_method", "register_method"]
