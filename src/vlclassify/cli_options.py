"""Options and helpers every command module shares (`vlclassify` commands: cli.py, cli_service.py):
the consoles, the option declarations, the backbone and cache a command builds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

# soft_wrap: a line is never cut; highlight/markup off: method specs and paths print as given
console = Console(soft_wrap=True, highlight=False, markup=False)
err = Console(stderr=True, soft_wrap=True, highlight=False, markup=False)

BACKBONE_OPT = typer.Option("effnet-minilm", "--backbone", "-b", help="Backbone name (see `vlclassify backbones`).")
BACKBONE_OPTS = typer.Option([], "--backbone-opt", help="Backbone option key=value (repeatable), e.g. path=./clip.")
CACHE_OPT = typer.Option(
    None, "--cache-dir", help="Feature cache folder (default $VLCLASSIFY_CACHE or ~/.cache/vlclassify)."
)
CACHE_WRITE_OPT = typer.Option(
    False,
    "--cache-write",
    help="Predict with torch through the feature cache and store the features of new images in it "
    "(default: answer from the ONNX export when the model has one, else read the cache and write nothing).",
)
SKIP_BAD_OPT = typer.Option(False, "--skip-bad", help="Skip unreadable images (counted) instead of failing.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace the vlclassify model in a non-empty --out folder.")
MODEL_ARG = typer.Argument(..., help="A folder written by `vlclassify fit`.")
PRESET_OPT = typer.Option(
    None,
    "--preset",
    help="Settings by name, comma-separated (see `vlclassify methods --presets`); a CoOp split file applies its "
    "dataset's preset (coop-<dataset>) unless 'none'.",
)


def _backbone(name: str, opts: list[str]):
    from .backbones import create_backbone
    from .utils import parse_options

    return create_backbone(name, **parse_options(opts))


def _cache(cache_dir: Path | None):
    from .features import FeatureCache

    return FeatureCache(cache_dir)


def _note(line: str) -> None:
    err.print(line)


def parse_ints(text: str, what: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]; a value that is not a positive integer is a one-line error naming it."""
    from .errors import DataError

    out = []
    for part in text.split(","):
        try:
            v = int(part)
        except ValueError:
            raise DataError(f"--{what}: {part.strip()!r} is not an integer (expected e.g. 1,2,4)") from None
        out.append(v)
    return out
