"""Detect-and-describe methods, registered by name in :data:`METHODS`.

:func:`load_methods` imports (and so registers) the trainable methods, R2D2 and D2-Net;
evaluation-only baselines (SIFT, RIFT) live in :mod:`s2study.baselines`.
"""

from s2study.methods.base import METHODS, DenseFeatures, Keypoints, Method

__all__ = ["METHODS", "DenseFeatures", "Keypoints", "Method", "build_method", "load_methods"]


def load_methods():
    """Import the method modules once (registration) and return :data:`METHODS`."""
    from s2study.methods import d2net, r2d2  # noqa: F401

    return METHODS


def build_method(name: str, **params) -> Method:
    """Instantiate a registered method with its hyperparameters.

    Raises:
        ConfigError: unknown method name or parameter.
    """
    from s2study.errors import ConfigError
    from s2study.registry import unknown_name_message

    cls = load_methods().get(name)
    for key in params:
        if key not in cls.default_params:
            raise ConfigError(
                unknown_name_message(f"parameter of method {name!r}", key, list(cls.default_params))
            )
    return cls(**params)
