"""A small registry of named objects: methods (a :class:`~s2study.methods.base.Method`
subclass registers itself by its ``name``) and baselines (``@BASELINES.register("sift")``)."""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
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
            old = self._items.get(name)
            if old is not None and _qualname(old) != _qualname(obj):
                raise ValueError(
                    f"{self.kind} {name!r} is registered twice ({_qualname(old)} and {_qualname(obj)})"
                )
            self._items[name] = obj  # the same definition again (a reloaded module) replaces it
            return obj

        return deco

    def remove(self, name: str) -> None:
        """Forget ``name`` (for tests that register a temporary entry)."""
        self._items.pop(name, None)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs sorted by name."""
        return sorted(self._items.items())

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


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def unknown_name_message(kind: str, name: object, known: list[str]) -> str:
    """``unknown method 'r2d3' (did you mean 'r2d2'?); known: d2net, r2d2, sift``."""
    hint = difflib.get_close_matches(str(name), known, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {kind} {name!r}{did_you_mean}; known: {', '.join(known) or '(none)'}"


#: the entry-point group of plug-in methods (see :mod:`s2study.methods`)
PLUGIN_GROUP = "s2study.methods"
_plugin_scan: dict[tuple[str, ...], list[importlib.metadata.EntryPoint]] = {}


def plugin_entry_points(group: str = PLUGIN_GROUP) -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of ``group``, sorted by name.

    Scanned once per ``sys.path`` (a scan reads every installed distribution's metadata).
    """
    key = (group, *sys.path)
    if key not in _plugin_scan:
        found = importlib.metadata.entry_points(group=group)
        _plugin_scan.clear()
        _plugin_scan[key] = sorted(found, key=lambda ep: (ep.name, ep.value))
    return _plugin_scan[key]


def plugin_preset_paths(group: str = PLUGIN_GROUP) -> dict[str, Path]:
    """Presets of plug-in methods: ``<entry point name>-*.yaml`` beside each plug-in's
    module, found without importing it (the module's file is looked up, not run)."""
    found: dict[str, Path] = {}
    for ep in plugin_entry_points(group):
        try:
            spec = importlib.util.find_spec(ep.module)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            continue
        for path in sorted(Path(spec.origin).parent.glob(f"{ep.name}-*.yaml")):
            found.setdefault(path.stem, path)
    return found
