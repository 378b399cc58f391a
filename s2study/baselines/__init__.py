"""Evaluation-only baselines, reached by name through the same call as checkpoints.

``BASELINES.get("sift")()`` returns an :class:`~s2study.features.Extractor`. The paper's
tables also compare CMM-Net, which has no public Python implementation: it has a reserved
entry that explains this when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from s2study.features import Extractor
from s2study.registry import Registry

BASELINES: Registry[Callable[..., Extractor]] = Registry("baseline")

#: modules that register baselines, imported on first use (keeps ``import s2study`` light)
_MODULES = ("s2study.baselines.sift", "s2study.baselines.rift", "s2study.baselines.reserved")


def load_baselines() -> Registry[Callable[..., Extractor]]:
    """Import every baseline module once and return the registry."""
    for module in _MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a baseline still being written
            if exc.name != module:
                raise
    return BASELINES
