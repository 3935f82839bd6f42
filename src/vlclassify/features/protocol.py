"""What a method reads its features through: one protocol over the three stores of them.

    in memory      FeatureSet        (extract.py)  keys image, pooled, spatial, text; views (flip, rrc0...)
    trunk          TrunkSet          (trunk.py)    key trunk: activations where a backbone.split's top begins
    streamed       StreamedFeatures  (stream.py)   rows stay in the store; batches come from StoredRows

Keys are distinct: `image` is the joint-space image embedding, `pooled` the raw pooled visual
features, `spatial` the token grid, `text` the paired text's embedding, `trunk` trunk activations.
Image views (the mirror image, random crops) are not features: a FeatureSet carries each extracted
view as another FeatureSet under `views`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

KEYS = ("image", "pooled", "spatial", "text", "trunk")


class Features(Protocol):
    """Row-aligned features of a dataset, read by key."""

    @property
    def views(self) -> Mapping[str, Features]:
        """Other image views of the same rows, by view name ("flip", "rrc0", ...)."""
        ...

    @property
    def grid(self) -> tuple[int, int] | None:
        """(h, w) of the spatial tokens, if any."""
        ...

    @property
    def skipped(self) -> list[int]:
        """Rows whose image could not be read (zero rows; `skip_bad`)."""
        ...

    def __len__(self) -> int: ...

    def has(self, key: str) -> bool:
        """Whether rows of `key` are here (in memory or in the store)."""
        ...

    def tensor(self, key: str) -> torch.Tensor:
        """Every row of `key` (errors name a key that is not here)."""
        ...

    def batch(self, keys: Sequence[str], start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows start:stop of `keys`: a head's input."""
        ...

    def index(self, idx: Sequence[int] | np.ndarray) -> Features:
        """The rows at `idx`, so a subset keeps its features."""
        ...

    def vectors_per_row(self) -> int:
        """Feature vectors per row (1 per embedding, the positions of a grid): a problem's size."""
        ...
