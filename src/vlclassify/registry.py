"""A tiny name -> factory registry, shared by backbones and methods (timm's `register_model` style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a public name to an entry of type `T` (a factory, a class, a preset); `kind` only appears
    in error messages."""

    def __init__(self, kind: str, load: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._docs: dict[str, str] = {}
        self._load = load  # imports the modules that register entries, once, at the first lookup

    def _loaded(self) -> dict[str, T]:
        if self._load is not None:
            load, self._load = self._load, None
            load()
        return self._entries

    def register(self, name: str, doc: str = "") -> Callable[[T], T]:
        """Decorator (or plain call) adding an entry under `name`; `doc` defaults to the first line
        of the entry's docstring (what `describe` and the CLI listings show)."""

        def deco(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            self._docs[name] = doc or next(iter((factory.__doc__ or "").strip().splitlines()), "")
            return factory

        return deco

    def unregister(self, name: str) -> None:
        """Remove `name` (a plugin loaded for a while, e.g. a method checked by a test)."""
        self._entries.pop(name, None)
        self._docs.pop(name, None)

    def names(self) -> list[str]:
        """Every registered name, sorted (the order listings and error messages use)."""
        return sorted(self._loaded())

    def describe(self, name: str) -> str:
        """The one-line description registered with `name` ("" if none)."""
        self._loaded()
        return self._docs.get(name, "")

    def get(self, name: str) -> T:
        """The entry registered as `name`; a KeyError naming the available ones otherwise."""
        try:
            return self._loaded()[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._loaded()
