"""Detect-and-describe methods, registered by name in :data:`METHODS`.

A method is one module: a :class:`~s2study.methods.base.Method` subclass that declares its
``name``, ``label``, parameters (:class:`~s2study.methods.base.Param`), paper schedule and
extraction options and fills in ``_init`` / ``_forward`` / ``_loss`` / ``_extract`` (see
:mod:`s2study.methods.base`). Defining the class registers it. :func:`load_methods` imports
every module of this package (``pkgutil.iter_modules``), so a new module here is found
without being listed anywhere, plus one preset ``<name>-<dataset>.yaml`` in
``s2study/presets/``.

**Plug-ins** (methods outside s2study) are found through the entry-point group
``s2study.methods``: a distribution that declares, in its ``pyproject.toml``::

    [project.entry-points."s2study.methods"]
    mine = "my_package.mine"          # name = the method's name; value = its module

is imported by :func:`load_methods`, which registers its classes; its presets are the files
``mine-*.yaml`` beside that module. ``pip install`` the plug-in on every machine that trains
or evaluates it (a study's Ray workers included); nothing in s2study is edited. A plug-in
that fails to import is skipped with a warning naming it.

Evaluation-only baselines (SIFT, RIFT) live in :mod:`s2study.baselines`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import warnings

from s2study.features import Features
from s2study.methods.base import (
    METHODS,
    DenseFeatures,
    Method,
    Param,
    ParamError,
    check_shape,
)
from s2study.registry import PLUGIN_GROUP, plugin_entry_points

__all__ = [
    "METHODS",
    "PLUGIN_GROUP",
    "DenseFeatures",
    "Features",
    "Method",
    "Param",
    "ParamError",
    "build_method",
    "check_shape",
    "load_methods",
]

log = logging.getLogger(__name__)
_builtin_loaded = False
#: entry points already imported (or failed), by ``name = value``
_plugins_tried: set[str] = set()


def load_methods():
    """Import every method module of this package and every plug-in once; return
    :data:`METHODS`."""
    global _builtin_loaded
    if not _builtin_loaded:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _builtin_loaded = True
    for ep in plugin_entry_points(PLUGIN_GROUP):
        tag = f"{ep.name} = {ep.value}"
        if tag in _plugins_tried:
            continue
        _plugins_tried.add(tag)
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not stop the others
            warnings.warn(
                f"s2study: plug-in method {tag!r} (entry point group {PLUGIN_GROUP}) failed to "
                f"import and is skipped: {type(exc).__name__}: {exc}",
                stacklevel=2,
            )
    return METHODS


def build_method(name: str, **params) -> Method:
    """Instantiate a registered method with its hyperparameters.

    Raises:
        ConfigError: unknown method name, or a parameter it refuses (unknown key, type,
            range: :class:`~s2study.methods.base.ParamError`).
    """
    return load_methods().get(name)(**params)
