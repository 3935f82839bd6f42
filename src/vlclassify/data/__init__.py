"""Datasets: one item model, loaders for user data and the built-in offline data."""

from .builtin import FASHION_MNIST_CLASSES, fashion_mnist, tuxpaint
from .decoder import decode
from .items import Dataset, Item
from .loaders import coop_split, image_folder, manifest
from .plan import plan_splits
from .precomputed import load_precomputed, save_precomputed
from .source import ArraySource, BytesSource, FileSource, ImageSource, MemberSource
from .spec import load_data, parse_spec, train_val_test
from .splitfile import read_split_file, write_split_file
from .splits import fewshot, kfold, sample_per_class, stratified_split

__all__ = [
    "Dataset",
    "Item",
    "ImageSource",
    "FileSource",
    "MemberSource",
    "ArraySource",
    "BytesSource",
    "decode",
    "load_data",
    "parse_spec",
    "train_val_test",
    "plan_splits",
    "read_split_file",
    "write_split_file",
    "load_precomputed",
    "save_precomputed",
    "fewshot",
    "kfold",
    "sample_per_class",
    "stratified_split",
    "fashion_mnist",
    "tuxpaint",
    "image_folder",
    "manifest",
    "coop_split",
    "FASHION_MNIST_CLASSES",
]
