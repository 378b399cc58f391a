"""The public extractor interface (design.md section 4)."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np


class Features(NamedTuple):
    """What an extractor returns for one image, sorted by decreasing score.

    Attributes:
        keypoints: (N, 2) float32 ``(x, y)`` in the input image's pixel coordinates.
        scores: (N,) float32.
        descriptors: (N, D) float32, L2-normalised.
    """

    keypoints: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray


class Extractor(Protocol):
    """``extractor(image, max_keypoints=4096) -> Features``.

    ``image`` is a numpy uint8 array, HxW (gray) or HxWx3 (RGB). ``N <= max_keypoints``.
    Extractors also carry a ``name`` (for tables) and a ``cache_key`` (a string identifying
    the weights and settings, for the evaluation cache).
    """

    name: str
    cache_key: str

    def __call__(self, image: np.ndarray, max_keypoints: int = 4096) -> Features: ...
