"""vlclassify: text-aware image classification with vision-language models.

```python
from vlclassify import create_backbone, create_method, load_data, fewshot
backbone = create_backbone("effnet-minilm")
splits = load_data("fashion-mnist")
train, val = fewshot(splits, shots=4, seed=1)
model = create_method("linear-probe", backbone).fit(train, val)
decisions = model.predict(splits["test"])
```

The names below are imported on first use (PEP 562): `import vlclassify.cli` or
`import vlclassify.errors` does not import torch, which is a second of every command's start.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `x as x`: explicit re-exports, for type checkers and linters
    from .backbones import create_backbone as create_backbone
    from .backbones import list_backbones as list_backbones
    from .data import Dataset as Dataset
    from .data import Item as Item
    from .data import fewshot as fewshot
    from .data import load_data as load_data
    from .errors import ConfigError as ConfigError
    from .errors import DataError as DataError
    from .errors import VLClassifyError as VLClassifyError
    from .features import FeatureCache as FeatureCache
    from .features import extract_features as extract_features
    from .methods import create_method as create_method
    from .methods import list_methods as list_methods
    from .methods import load_method as load_method

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "create_backbone": ".backbones",
    "list_backbones": ".backbones",
    "create_method": ".methods",
    "list_methods": ".methods",
    "load_method": ".methods",
    "load_data": ".data",
    "fewshot": ".data",
    "Dataset": ".data",
    "Item": ".data",
    "FeatureCache": ".features",
    "extract_features": ".features",
    "VLClassifyError": ".errors",
    "DataError": ".errors",
    "ConfigError": ".errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # `vlclassify.methods` after `import vlclassify`
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'vlclassify' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
