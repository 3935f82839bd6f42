"""Methods: one file per method, each registering itself by name when imported.

The names below are imported on first use (PEP 562), and the method modules on the registry's
first lookup (`METHODS`): `methods.decision` (how scores become answers) is torch-free, and the
ONNX predict path (onnx_predict.py) reads it without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils import lazy_exports

if TYPE_CHECKING:  # `x as x`: explicit re-exports, for type checkers and linters
    from .base import Encoded as Encoded
    from .base import Method as Method
    from .base import load_method as load_method
    from .registry import METHODS as METHODS
    from .registry import create_method as create_method
    from .registry import list_methods as list_methods
    from .registry import register_method as register_method

# public name -> the submodule that defines it
_EXPORTS = {
    "Encoded": ".base",
    "Method": ".base",
    "load_method": ".base",
    "METHODS": ".registry",
    "create_method": ".registry",
    "list_methods": ".registry",
    "register_method": ".registry",
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
