"""A small explicit registry: ``@METHODS.register("r2d2")`` instead of import-path magic."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from s2study.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; a miss lists the registered names (and suggests one)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name is a bug."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise :class:`ConfigError`."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(unknown_name_message(self.kind, name, self.names())) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


def unknown_name_message(kind: str, name: object, known: list[str]) -> str:
    """``unknown method 'r2d3' (did you mean 'r2d2'?); known: d2net, r2d2, sift``."""
    hint = difflib.get_close_matches(str(name), known, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {kind} {name!r}{did_you_mean}; known: {', '.join(known) or '(none)'}"
