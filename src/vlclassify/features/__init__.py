"""Feature extraction and the on-disk feature cache."""

from .cache import FeatureCache
from .extract import VIEWS, FeatureSet, encode_texts, extract_features

__all__ = ["FeatureCache", "FeatureSet", "VIEWS", "encode_texts", "extract_features"]
