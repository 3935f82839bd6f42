"""Method registry: `list_methods()` and `create_method(name, backbone, **options)`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError
from .base import METHODS as METHODS
from .base import MULTI, SINGLE, TASKS, TEXT, Method, TrainOptions

if TYPE_CHECKING:
    from ..backbones.base import Backbone

M = TypeVar("M", bound="type[Method]")


def register_method(cls: M) -> M:
    """Class decorator: registers a Method subclass under its `name`."""
    doc = next(iter((cls.__doc__ or "").strip().splitlines()), "")
    METHODS.register(cls.name, doc)(cls)
    return cls


def list_methods() -> list[str]:
    """The registered method names, for `create_method` and `vlclassify methods`."""
    return METHODS.names()


def create_method(name: str, backbone: Backbone | None = None, **options: Any) -> Method:
    """Build a method by name; `backbone` defaults to the offline `effnet-minilm`."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    if backbone is None:
        from ..backbones import create_backbone

        backbone = create_backbone("effnet-minilm")
    return METHODS.get(name)(backbone, **options)


def contract_table() -> str:
    """Markdown table of every registered method's declarations (docs/methods.md is this table)."""
    head = [
        "method",
        "single-label",
        "multi-label",
        "paired text",
        "several tasks",
        "features",
        "training views",
        "trains",
        "chosen on validation",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in list_methods():
        cls = METHODS.get(name)
        cell = {
            k: "yes" if k in cls.kinds else ("option" if k in cls.optional_kinds else "—")
            for k in (SINGLE, MULTI, TEXT, TASKS)
        }
        trains = "Trainer" if issubclass(cls.Config, TrainOptions) else "—"  # training options: the Trainer
        chosen = ", ".join(filter(None, [cls.selects, "decision rule" + (" per task" if TASKS in cls.kinds else "")]))
        lines.append(
            f"| `{name}` | {cell[SINGLE]} | {cell[MULTI]} | {cell[TEXT]} | {cell[TASKS]} | "
            f"{', '.join(sorted(cls.needs))} | {', '.join(cls.train_views)} | {trains} | {chosen} |"
        )
    return "\n".join(lines) + "\n"
