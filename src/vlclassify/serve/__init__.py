"""`vlclassify serve`: a fitted model behind an HTTP API and a web page (see app.py)."""

from .app import ServeConfig, create_app, serve
from .batching import BatchConfig, MicroBatcher

__all__ = ["BatchConfig", "MicroBatcher", "ServeConfig", "create_app", "serve"]
