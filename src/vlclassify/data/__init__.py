"""Datasets: one item model, loaders for user data and the built-in offline data.

The names below are imported on first use (PEP 562), as in the top-level package: the ONNX
predict path (onnx_predict.py) decodes images with `data.decoder` and must not import torch,
which `precomputed` (feature files) and the loaders behind `load_data` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils import lazy_exports

if TYPE_CHECKING:  # `x as x`: explicit re-exports, for type checkers and linters
    from .builtin import FASHION_MNIST_CLASSES as FASHION_MNIST_CLASSES
    from .builtin import fashion_mnist as fashion_mnist
    from .builtin import tuxpaint as tuxpaint
    from .decoder import decode as decode
    from .items import Dataset as Dataset
    from .items import Item as Item
    from .loaders import coop_split as coop_split
    from .loaders import image_folder as image_folder
    from .loaders import manifest as manifest
    from .plan import plan_splits as plan_splits
    from .precomputed import load_precomputed as load_precomputed
    from .precomputed import save_precomputed as save_precomputed
    from .source import ArraySource as ArraySource
    from .source import BytesSource as BytesSource
    from .source import FileSource as FileSource
    from .source import ImageSource as ImageSource
    from .source import MemberSource as MemberSource
    from .spec import load_data as load_data
    from .spec import parse_spec as parse_spec
    from .spec import train_val_test as train_val_test
    from .splitfile import read_split_file as read_split_file
    from .splitfile import write_split_file as write_split_file
    from .splits import fewshot as fewshot
    from .splits import kfold as kfold
    from .splits import sample_per_class as sample_per_class
    from .splits import stratified_split as stratified_split

# public name -> the submodule that defines it
_EXPORTS = {
    "Dataset": ".items",
    "Item": ".items",
    "ImageSource": ".source",
    "FileSource": ".source",
    "MemberSource": ".source",
    "ArraySource": ".source",
    "BytesSource": ".source",
    "decode": ".decoder",
    "load_data": ".spec",
    "parse_spec": ".spec",
    "train_val_test": ".spec",
    "plan_splits": ".plan",
    "read_split_file": ".splitfile",
    "write_split_file": ".splitfile",
    "load_precomputed": ".precomputed",
    "save_precomputed": ".precomputed",
    "fewshot": ".splits",
    "kfold": ".splits",
    "sample_per_class": ".splits",
    "stratified_split": ".splits",
    "fashion_mnist": ".builtin",
    "tuxpaint": ".builtin",
    "image_folder": ".loaders",
    "manifest": ".loaders",
    "coop_split": ".loaders",
    "FASHION_MNIST_CLASSES": ".builtin",
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
