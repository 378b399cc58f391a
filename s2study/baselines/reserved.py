"""Reserved baseline names: methods of the paper's tables that s2study cannot run.

Asking for one raises :class:`~s2study.errors.ConfigError` saying why and how to add a method,
instead of a bare "unknown baseline".
"""

from __future__ import annotations

from s2study.baselines import BASELINES
from s2study.errors import ConfigError
from s2study.features import Extractor

HOW_TO_ADD = (
    "To add a method, write a module that registers a factory returning an extractor "
    "(callable (image uint8 HxW or HxWx3, max_keypoints) -> s2study.features.Features, with "
    '`name` and `cache_key` attributes) via `@BASELINES.register("<name>")` from '
    "s2study.baselines, and list that module in s2study.baselines._MODULES; a trainable "
    "network subclasses s2study.methods.base.Method and registers in METHODS instead."
)


@BASELINES.register("cmm-net")
def cmm_net(**settings: object) -> Extractor:
    """CMM-Net (Cui et al.): reserved; it has no public Python implementation."""
    raise ConfigError(
        "baseline 'cmm-net' is reserved: CMM-Net (the cross-modality matching network the "
        "S2-Net paper compares against) has no public Python implementation or weights, so "
        "s2study cannot run it. " + HOW_TO_ADD
    )
