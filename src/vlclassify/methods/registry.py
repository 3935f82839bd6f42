"""Method registry: `list_methods()` and `create_method(name, backbone, **options)`."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..registry import Registry

METHODS: Registry = Registry("method")


def register_method(cls):
    """Class decorator: registers a Method subclass under its `name`."""
    doc = next(iter((cls.__doc__ or "").strip().splitlines()), "")
    METHODS.register(cls.name, doc)(cls)
    return cls


def list_methods() -> list[str]:
    return METHODS.names()


def create_method(name: str, backbone=None, **options: Any):
    """Build a method by name; `backbone` defaults to the offline `effnet-minilm`."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    if backbone is None:
        from ..backbones import create_backbone

        backbone = create_backbone("effnet-minilm")
    return METHODS.get(name)(backbone, **options)


def contract_table() -> str:
    """Markdown table of every registered method's declarations (docs/methods.md is this table)."""
    from .base import MULTI, TASKS, TEXT, Method

    lines = [
        "| method | single-label | multi-label | paired text | several tasks | features | trains | decision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in list_methods():
        cls = METHODS.get(name)
        k = cls.kinds
        yes = {kind: "yes" if kind in k else "—" for kind in ("single-label", MULTI, TEXT, TASKS)}
        decision = "top class, or per-class thresholds for a target precision"
        if MULTI in k:
            decision += "; multi-label: per-class thresholds"
        if TASKS in k:
            decision += "; one rule per task"
        trains = "Trainer" if cls.stages is not Method.stages else "no (validation grid)"
        lines.append(
            f"| `{name}` | {yes['single-label']} | {yes[MULTI]} | {yes[TEXT]} | {yes[TASKS]} | "
            f"{', '.join(sorted(cls.needs))} | {trains} | {decision} |"
        )
    return "\n".join(lines) + "\n"
