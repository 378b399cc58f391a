"""Registration-style evaluation: each pair's infrared image offset by a known homography.

The datasets are pixel-aligned, so their ground truth is the identity, which favours
descriptors with no invariance at all. The warped protocol draws one homography ``W`` per pair
and warps image B by it; the ground truth becomes ``W @ H`` (A -> warped B):

- ``W`` is drawn by :func:`draw_warp`, a pure function of ``(seed, pair_id)`` and the image
  size: the random numbers come from ``numpy.random.SeedSequence([seed, crc32(pair_id)])``,
  so a pair gets the same warp in every subset of a split, on every machine and Python;
- a rotation uniform in [-10, 10] degrees and a scale uniform in [1, 1.2], both about the
  image centre (the scale >= 1 zooms in, which keeps the warped content mostly inside the
  frame), then each corner jittered by up to 10 % of the width (x) and height (y): a mild
  projective part. The matrices are those of :mod:`s2study.data.transforms`
  (:func:`~s2study.data.transforms.similarity_about`,
  :func:`~s2study.data.transforms.corner_jitter`), in float64;
- :class:`WarpedPairs` wraps any :class:`~s2study.data.pairs.PairDataset`; its samples carry
  the warped B (``cv2.warpPerspective``: B's size, linear interpolation, black border) and
  optionally cache it as a PNG (lossless, so a cached sample equals a computed one).

Homographies map pixel coordinates with pixel centres at integers (the
:mod:`s2study.geometry` convention), as ``cv2.warpPerspective`` reads them.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from s2study.data.pairs import PairDataset, PairSample
from s2study.errors import ConfigError

#: rotation range, degrees (uniform in [-ROTATION_DEG, ROTATION_DEG])
ROTATION_DEG = 10.0
#: scale range (uniform)
SCALE = (1.0, 1.2)
#: corner jitter, as a fraction of the width (x) and height (y) (uniform in [-J, J])
CORNER_JITTER = 0.1

ALIGNED = "aligned"
_PROTOCOL = re.compile(r"aligned|warped:\d+")


def check_seed(seed: int | str, what: str = "warp seed") -> int:
    """A warp seed as a non-negative int; a string must be decimal digits.

    Raises:
        ConfigError: anything else (negative, bool, float, non-numeric text).
    """
    value: object = seed
    if isinstance(seed, str) and re.fullmatch(r"\s*\d+\s*", seed):
        value = int(seed)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {seed!r}")
    return int(value)


def protocol_name(warp: int | None) -> str:
    """``"aligned"`` for no warp, else ``"warped:SEED"``."""
    return ALIGNED if warp is None else f"warped:{check_seed(warp)}"


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is ``"aligned"`` or ``"warped:SEED"``, else :class:`ConfigError`."""
    if not isinstance(protocol, str) or not _PROTOCOL.fullmatch(protocol):
        raise ConfigError(
            f"evaluation protocol must be 'aligned' or 'warped:SEED', got {protocol!r}"
        )
    return protocol


@dataclass(frozen=True)
class Warp:
    """One drawn warp: its parameters and its matrix.

    Attributes:
        angle_deg: rotation about the image centre, degrees, positive clockwise on screen.
        scale: isotropic scale about the image centre.
        jitter: (4, 2) corner displacements as fractions of (width, height), corners
            top-left, top-right, bottom-right, bottom-left.
        matrix: (3, 3) float64 homography ``jitter @ rotate_scale`` mapping B's pixels onto
            the warped B, normalised so ``matrix[2, 2] == 1``.
    """

    angle_deg: float
    scale: float
    jitter: np.ndarray
    matrix: np.ndarray


def draw_warp(seed: int, pair_id: str, height: int, width: int) -> Warp:
    """The warp of pair ``pair_id`` under ``seed``, for an image of ``height`` x ``width``.

    Deterministic in ``(seed, pair_id, height, width)``; see the module docstring for the
    distribution.
    """
    from s2study.data.transforms import corner_jitter, similarity_about

    seed = check_seed(seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(pair_id.encode())]))
    angle = float(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    scale = float(rng.uniform(*SCALE))
    jitter = rng.uniform(-CORNER_JITTER, CORNER_JITTER, size=(4, 2))
    f64 = {"dtype": torch.float64}
    h, w = torch.tensor([float(height)], **f64), torch.tensor([float(width)], **f64)
    center = torch.tensor([[(width - 1) / 2, (height - 1) / 2]], **f64)
    rotate_scale = similarity_about(
        center, torch.tensor([math.radians(angle)], **f64), torch.tensor([scale], **f64)
    )
    matrix = (corner_jitter(torch.from_numpy(jitter)[None], h, w) @ rotate_scale)[0].numpy()
    return Warp(angle, scale, jitter, matrix / matrix[2, 2])


def warp_image(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``image`` warped by ``matrix`` onto a canvas of its own size (linear, black border)."""
    h, w = image.shape[:2]
    return cv2.warpPerspective(
        image,
        np.asarray(matrix, np.float64),
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def warp_sample(
    sample: PairSample, seed: int, pair_id: str | None = None, cache_dir: Path | None = None
) -> PairSample:
    """``sample`` with image B warped by its drawn ``W`` and the homography ``W @ H``.

    Args:
        sample: the aligned (or registered) pair.
        seed: the warp seed.
        pair_id: the id the warp is drawn for (default ``sample.pair_id``).
        cache_dir: when given, the warped B is read from / written to
            ``cache_dir/<safe pair id>_<hash>_b.png``; the hash covers B's content and ``W``,
            so a changed image (another size limit, an edited file) never reads a stale entry.
    """
    pair_id = sample.pair_id if pair_id is None else pair_id
    h, w = sample.image_b.shape[:2]
    matrix = draw_warp(seed, pair_id, h, w).matrix
    path = (
        None if cache_dir is None else _cache_path(Path(cache_dir), pair_id, sample.image_b, matrix)
    )
    warped = _read_png(path, sample.image_b.shape) if path is not None else None
    if warped is None:
        warped = warp_image(sample.image_b, matrix)
        if path is not None:
            _write_png(path, warped)
    homography = matrix @ np.asarray(sample.homography, np.float64)
    return replace(sample, image_b=warped, homography=homography / homography[2, 2])


def _cache_path(folder: Path, pair_id: str, image: np.ndarray, matrix: np.ndarray) -> Path:
    from s2study.evaluate import _safe, image_digest

    digest = hashlib.blake2b(digest_size=6)
    digest.update(image_digest(image).encode())
    digest.update(np.ascontiguousarray(matrix, np.float64).tobytes())
    return folder / f"{_safe(pair_id)}_{digest.hexdigest()}_b.png"


def _read_png(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached RGB image, or None when absent, unreadable or of another shape."""
    if not path.is_file():
        return None
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        return None
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image if image.shape == tuple(shape) else None


def _write_png(path: Path, image: np.ndarray) -> None:
    from s2study.checkpoint import atomic_write_bytes

    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, buffer = cv2.imencode(".png", bgr)
    if not ok:  # pragma: no cover - OpenCV encodes every uint8 image as PNG
        return
    atomic_write_bytes(path, lambda f: f.write(buffer.tobytes()))


class WarpedPairs:
    """A :class:`~s2study.data.pairs.PairDataset` whose B images are warped (warped protocol).

    Args:
        dataset: the inner pair dataset.
        seed: warp seed (non-negative int); pair ``i`` gets ``draw_warp(seed, pair_id, ...)``.
        cache_dir: when given, warped B images are cached as PNG under
            ``cache_dir/warp-<seed>/``.

    Attributes:
        ids, name: those of the inner dataset (``name`` falls back to its class name).
        protocol: ``"warped:<seed>"`` (what :func:`s2study.evaluate.evaluate` records).
    """

    def __init__(self, dataset: PairDataset, seed: int, cache_dir: Path | None = None) -> None:
        self.seed = check_seed(seed)
        self.dataset = dataset
        self.ids = list(dataset.ids)
        self.name = str(getattr(dataset, "name", type(dataset).__name__))
        self.protocol = protocol_name(self.seed)
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / f"warp-{self.seed}"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> PairSample:
        sample = self.dataset[index]
        pair_id = sample.pair_id or str(index)
        return warp_sample(sample, self.seed, pair_id, self.cache_dir)
