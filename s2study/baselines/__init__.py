"""Evaluation-only baselines, reached by name through the same call as checkpoints.

``BASELINES.get("sift")()`` returns an :class:`~s2study.features.Extractor`. The paper's
tables also compare CMM-Net, which has no public Python implementation: it has a reserved
entry that explains this when asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from s2study.features import Extractor
from s2study.registry import Registry

BASELINES: Registry[Callable[..., Extractor]] = Registry("baseline")
_loaded = False


def load_baselines() -> Registry[Callable[..., Extractor]]:
    """Import every module of this package once (each registers its baselines with
    ``@BASELINES.register(name)``; a new module is found without being listed) and return
    the registry. The modules are imported on first use, which keeps ``import s2study`` light.
    """
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return BASELINES
