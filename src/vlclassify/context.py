"""How a job runs, apart from what the model is: one object passed to `fit` / `predict`.

A method's `Config` says what it learns; a `RunContext` says where features are cached, whether
progress bars show, which extraction runtime runs and how bad images are treated. The CLI, the
service and the benchmarks build one and pass it in; nothing sets run options on a model from
outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .features import FeatureCache

RUNTIMES = ("auto", "torch", "onnx")


@dataclass(frozen=True)
class RunContext:
    """Run options of one fit, eval or predict (defaults: a library user's)."""

    cache: FeatureCache | None = None  # the per-image feature store; None = the default folder
    cache_write: bool = True  # False: read cached features, compute the rest in memory (predict, serve)
    progress: bool = True  # progress bars on long work (extraction, training)
    runtime: str = "auto"  # extraction runtime: auto | torch | onnx
    skip_bad: bool = False  # unreadable images: skipped and counted (True) or an error naming them
    stream: bool = False  # train on batches read from the feature store (methods tagged `stream`)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            from .errors import ConfigError

            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
