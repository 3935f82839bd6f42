"""vlclassify: text-aware image classification with vision-language models.

```python
from vlclassify import create_backbone, create_method, load_data, fewshot
backbone = create_backbone("effnet-minilm")
splits = load_data("fashion-mnist")
train, val = fewshot(splits["train"], shots=4, seed=1)
model = create_method("linear-probe", backbone).fit(train, val)
probs = model.predict_proba(splits["test"])
```
"""

from .backbones import create_backbone, list_backbones
from .data import Dataset, Item, fewshot, load_data
from .errors import ConfigError, DataError, VLClassifyError
from .features import FeatureCache, extract_features
from .methods import create_method, list_methods, load_method

__version__ = "0.1.0"
__all__ = [
    "create_backbone",
    "list_backbones",
    "create_method",
    "list_methods",
    "load_method",
    "load_data",
    "fewshot",
    "Dataset",
    "Item",
    "FeatureCache",
    "extract_features",
    "VLClassifyError",
    "DataError",
    "ConfigError",
]
