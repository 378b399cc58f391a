"""Reserved baseline names: methods of the paper's tables that s2study cannot run.

Asking for one raises :class:`~s2study.errors.ConfigError` saying why and how to add a method,
instead of a bare "unknown baseline".
"""

from __future__ import annotations

from s2study.baselines import BASELINES
from s2study.errors import ConfigError
from s2study.features import Extractor

HOW_TO_ADD = (
    "To add an evaluation-only method, write a module in s2study/baselines/ that registers a "
    "factory returning an extractor (callable (image uint8 HxW or HxWx3, max_keypoints) -> "
    "s2study.features.Features, with `name` and `cache_key` attributes) via "
    '`@BASELINES.register("<name>")` from s2study.baselines; a trainable network subclasses '
    "s2study.methods.Method, in a module of s2study/methods/ or in a plug-in package declaring "
    "the entry point group s2study.methods (see s2study.methods)."
)


@BASELINES.register("cmm-net")
def cmm_net(**settings: object) -> Extractor:
    """CMM-Net (Cui et al.): reserved; it has no public Python implementation."""
    raise ConfigError(
        "baseline 'cmm-net' is reserved: CMM-Net (the cross-modality matching network the "
        "S2-Net paper compares against) has no public Python implementation or weights, so "
        "s2study cannot run it. " + HOW_TO_ADD
    )
