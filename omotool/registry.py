"""Name → entry tables for the things users pick by name (sparsifiers, merge methods, ...).

Adding a method is one ``register`` call next to its implementation; an unknown name gets the
closest known names in its error message.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from omotool.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered mapping from names to entries of one kind, with helpful lookup errors."""

    def __init__(self, kind: str, registered_in: str = "") -> None:
        """``registered_in``: the module whose import registers the entries, imported on the
        first lookup (so that the registry's module need not import its entries' module)."""
        self.kind = kind
        self._registered_in = registered_in
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    @property
    def _registered(self) -> dict[str, T]:
        if self._registered_in:
            importlib.import_module(self._registered_in)
            self._registered_in = ""
        return self._entries

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("ties", help="...")`` adds the decorated entry."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            self._help[name] = help
            return entry

        return add

    def get(self, name: str) -> T:
        """The entry called ``name``; a UsageError naming close matches otherwise."""
        try:
            return self._registered[name]
        except KeyError:
            raise UsageError(
                f"Unknown {self.kind} {name!r}. Choose one of: {', '.join(self._entries)}."
                + self.suggestion(name)
            ) from None

    def suggestion(self, name: object) -> str:
        """`` Did you mean 'a' or 'b'?`` naming the entries close to ``name``; "" if none is."""
        close = difflib.get_close_matches(str(name), self._registered, n=3, cutoff=0.5)
        return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""

    def help(self, name: str) -> str:
        self._registered  # noqa: B018 - the entries (and their help) are registered
        return self._help[name]

    def names(self) -> list[str]:
        return list(self._registered)

    def __contains__(self, name: object) -> bool:
        return name in self._registered

    def __iter__(self) -> Iterator[str]:
        return iter(self._registered)

    def __len__(self) -> int:
        return len(self._registered)
