"""s2study: S2-Net cross-modality local features and distributed hyperparameter studies.

The public Python API is :func:`load_extractor`. Importing the package is light: torch,
Ray, MLflow and Optuna are imported only by the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load_extractor"]


def load_extractor(checkpoint, device: str = "cpu", **options):
    """Return ``extractor(image, max_keypoints=4096) -> Features`` for a checkpoint.

    Args:
        checkpoint: an s2study checkpoint, the official R2D2 checkpoint file, or a baseline
            name such as ``"sift"``.
        device: torch device for network methods.
        options: extraction options, e.g. ``multiscale=True`` for R2D2's image pyramid.

    See :mod:`s2study.extractor` for details.
    """
    from s2study.extractor import load_extractor as _load

    return _load(checkpoint, device=device, **options)
