"""The sparse features every method and baseline returns, and the extractor interface
(design.md section 4).

:class:`Features` is the one sparse feature type of the project: a method's ``extract``
returns it with torch tensors on the method's device, an extractor (``load_extractor``, a
baseline) with numpy arrays, and the metrics read either (:meth:`Features.as_tensors`).
The helpers a plug-in extractor needs (:func:`as_rgb_uint8`, :func:`check_max_keypoints`,
:func:`finalize_features`, :func:`make_cache_key`) live here too, so that baselines and
methods depend on this interface module only.

This module imports numpy only; torch is imported by the helpers that convert to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Features:
    """The sparse features of one image, sorted by decreasing score.

    ``keypoints, scores, descriptors = features`` unpacks it (the documented extractor
    API); ``len(features)`` is the number of keypoints.

    Attributes:
        keypoints: (N, 2) float32 ``(x, y)`` in the input image's pixel coordinates.
        scores: (N,) float32.
        descriptors: (N, D) float32, L2-normalised.

    The three are numpy arrays (what an extractor returns) or torch tensors (what a
    method's ``extract`` returns, on its device); :meth:`as_tensors` and :meth:`as_numpy`
    convert.
    """

    keypoints: Any
    scores: Any
    descriptors: Any

    @property
    def xy(self) -> Any:
        """The keypoints (an alias: ``features.xy``)."""
        return self.keypoints

    def __iter__(self) -> Iterator[Any]:
        return iter((self.keypoints, self.scores, self.descriptors))

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    def top(self, k: int) -> Features:
        """The ``k`` best keypoints (all of them when there are fewer)."""
        return Features(self.keypoints[:k], self.scores[:k], self.descriptors[:k])

    def to(self, device: Any) -> Features:
        """The same features as torch tensors on ``device``."""
        t = self.as_tensors()
        return Features(t.keypoints.to(device), t.scores.to(device), t.descriptors.to(device))

    def as_tensors(self) -> Features:
        """The features as float32 torch tensors (numpy arrays are wrapped, not copied)."""
        import torch

        def tensor(v: Any) -> torch.Tensor:
            if isinstance(v, torch.Tensor):
                return v.float()
            return torch.from_numpy(np.asarray(v, dtype=np.float32))

        return Features(
            tensor(self.keypoints).reshape(-1, 2),
            tensor(self.scores).reshape(-1),
            tensor(self.descriptors),
        )

    def as_numpy(self) -> Features:
        """The features as float32 numpy arrays (tensors are moved to the CPU)."""

        def array(v: Any) -> np.ndarray:
            if hasattr(v, "detach"):
                v = v.detach().cpu().numpy()
            return np.asarray(v, dtype=np.float32)

        return Features(array(self.keypoints), array(self.scores), array(self.descriptors))


class Extractor(Protocol):
    """``extractor(image, max_keypoints=4096) -> Features``.

    ``image`` is a numpy uint8 array, HxW (gray) or HxWx3 (RGB). ``N <= max_keypoints``.
    Extractors also carry a ``name`` (for tables) and a ``cache_key`` (a string identifying
    the weights and settings, for the evaluation cache).
    """

    name: str
    cache_key: str

    def __call__(self, image: np.ndarray, max_keypoints: int = 4096) -> Features: ...


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Check an input image and return it as (H, W, 3) uint8 RGB (gray replicated).

    Raises:
        DataError: not a uint8 HxW, HxWx1 or HxWx3 array.
    """
    from s2study.errors import DataError

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"expected a uint8 numpy image, got {kind}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise DataError(f"expected an HxW or HxWx3 image, got shape {image.shape}")


def check_max_keypoints(max_keypoints: int) -> int:
    """Return ``max_keypoints`` if it is a positive int, else raise :class:`ConfigError`."""
    from s2study.errors import ConfigError

    if (
        isinstance(max_keypoints, bool)
        or not isinstance(max_keypoints, (int, np.integer))
        or max_keypoints <= 0
    ):
        raise ConfigError(f"max_keypoints (K) must be a positive integer, got {max_keypoints!r}")
    return int(max_keypoints)


def finalize_features(keypoints: Any, scores: Any, descriptors: Any, max_keypoints: int) -> Features:
    """Features in the interface's form: numpy, sorted by decreasing score (stable), at most
    ``max_keypoints``, float32, descriptors L2-normalised.

    Args:
        keypoints: (N, 2) ``(x, y)``; scores: (N,); descriptors: (N, D); numpy arrays or
            torch tensors (moved to the CPU).
    """
    xy, sc, desc = Features(keypoints, scores, descriptors).as_numpy()
    order = np.argsort(-sc, kind="stable")[:max_keypoints]
    desc = desc[order]
    norms = np.linalg.norm(desc, axis=1, keepdims=True)
    desc = desc / np.maximum(norms, 1e-12)
    return Features(
        np.ascontiguousarray(xy[order].reshape(-1, 2)),
        np.ascontiguousarray(sc[order]),
        np.ascontiguousarray(desc, dtype=np.float32),
    )


def make_cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (weights digest, method, options...)."""
    from s2study import __version__

    text = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
