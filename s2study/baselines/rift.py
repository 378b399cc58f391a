"""RIFT: radiation-variation insensitive feature transform (Li, Hu, Ai, IEEE TIP 29, 2019).

A hand-crafted multimodal baseline, evaluation only. Pipeline for one image:

1. **Phase congruency** (Kovesi's PC_2 with noise compensation) from a log-Gabor bank of
   ``nscale`` x ``norient`` filters, computed in the frequency domain: one FFT of the image,
   one batched inverse FFT of all filter responses; the bank is built once per image size.
2. **Feature points**: edge points from FAST on the maximum moment map ``M`` (normalised to
   [0, 1], contrast threshold 0.05, as RIFT's code) and corner points from local maxima of the
   minimum moment map ``m``; the two sets are merged, each point's strength being its moment
   value in its own min-max-normalised map, and the strongest ``K`` are kept.
3. **Maximum index map** (MIM): per pixel, the orientation whose amplitude summed over scales
   is largest.
4. **Descriptor**: MIM histograms (``norient`` bins) on a ``grid`` x ``grid`` layout of cells
   over a ``patch_size + 1`` pixel square around the point (``x - P/2 .. x + P/2``, RIFT's
   patch), L2-normalised: 6 x 6 x 6 = 216 values. Pixels outside the image count nowhere, so
   points near the border keep a (partial) descriptor instead of being dropped.

Rotation. ``rotation="none"`` (default) is the variant of RIFT's released code
(``RIFT_no_rotation_invariance``) and the right one for pixel-aligned pairs such as RoadScene.
A rotation shifts the MIM's values cyclically (by ``rotation / (180 / norient)`` indices) as
well as moving them; the paper undoes the unknown shift by building the "convolution
sequence ring", one MIM per possible starting orientation, and settling which one applies
when the two images are matched, a step a per-image extractor cannot take.
``rotation="dominant_index"`` settles it per patch instead (the idea RIFT2 later adopted):
the patch's most frequent MIM value ``w`` is re-indexed to 0 (``(MIM - w) mod norient``) and
the sampling grid is turned to filter ``w``'s direction. That direction is known only modulo
180 degrees; our own choice between the two is the side on which the ``M``-weighted centroid
of a disc around the point lies. Under 90-degree rotations this makes descriptors exactly
invariant (tested); other angles are handled to the 180 / norient degree quantisation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple

import cv2
import numpy as np

from s2study.baselines import BASELINES
from s2study.errors import ConfigError
from s2study.features import Features

_EPS = 1e-4  # Kovesi's guard against division by zero (image values are in 0..255)
_ROTATIONS = ("none", "dominant_index")


@dataclass(frozen=True)
class RIFTConfig:
    """RIFT settings; defaults are those of the paper and its released code.

    Attributes:
        nscale, norient: log-Gabor scales and orientations.
        min_wavelength, mult, sigma_onf: smallest filter wavelength (px), wavelength ratio
            between scales, bandwidth (sigma / centre frequency) of the radial Gaussian.
        k, cut_off, g: noise threshold in noise standard deviations, and the frequency-spread
            sigmoid's cut-off and gain (Kovesi's names).
        patch_size, grid: descriptor patch side (px) and cells per side.
        fast_threshold: FAST contrast on the normalised maximum moment map.
        corner_threshold: minimum normalised minimum moment of a corner point.
        rotation: "none" or "dominant_index" (see the module docstring).
    """

    nscale: int = 4
    norient: int = 6
    min_wavelength: float = 3.0
    mult: float = 1.6
    sigma_onf: float = 0.75
    k: float = 1.0
    cut_off: float = 0.5
    g: float = 3.0
    patch_size: int = 96
    grid: int = 6
    fast_threshold: float = 0.05
    corner_threshold: float = 0.05
    rotation: Literal["none", "dominant_index"] = "none"

    def __post_init__(self) -> None:
        """Reject settings outside their ranges with one :class:`ConfigError` naming them."""
        problems = []
        if self.nscale < 2:
            problems.append(f"nscale={self.nscale} (needs >= 2)")
        if self.norient < 2:
            problems.append(f"norient={self.norient} (needs >= 2)")
        if self.min_wavelength < 2:
            problems.append(f"min_wavelength={self.min_wavelength} (needs >= 2 px)")
        if self.mult <= 1:
            problems.append(f"mult={self.mult} (needs > 1)")
        if not 0 < self.sigma_onf < 1:
            problems.append(f"sigma_onf={self.sigma_onf} (needs 0 < sigma_onf < 1)")
        if self.patch_size < self.grid or self.grid < 1:
            problems.append(
                f"patch_size={self.patch_size}, grid={self.grid} (needs patch >= grid >= 1)"
            )
        if not 0 <= self.fast_threshold < 1 or not 0 <= self.corner_threshold < 1:
            problems.append("fast_threshold and corner_threshold must lie in [0, 1)")
        if self.rotation not in _ROTATIONS:
            problems.append(f"rotation={self.rotation!r} (allowed: {', '.join(_ROTATIONS)})")
        if problems:
            raise ConfigError("invalid RIFT settings: " + "; ".join(problems))


class PhaseCongruency(NamedTuple):
    """Phase congruency of one image.

    Attributes:
        max_moment: (H, W) maximum moment of the PC covariance (edge strength).
        min_moment: (H, W) minimum moment (corner strength).
        amplitude: (O, H, W) log-Gabor amplitude summed over scales, per orientation.
    """

    max_moment: np.ndarray
    min_moment: np.ndarray
    amplitude: np.ndarray


@functools.lru_cache(maxsize=4)
def log_gabor_bank(
    shape: tuple[int, int],
    nscale: int = 4,
    norient: int = 6,
    min_wavelength: float = 3.0,
    mult: float = 1.6,
    sigma_onf: float = 0.75,
) -> np.ndarray:
    """Frequency responses of the log-Gabor bank, laid out like ``np.fft.fft2`` output.

    Filter ``(s, o)`` has centre frequency ``1 / (min_wavelength * mult**s)`` cycles/px and
    points along ``o * pi / norient``, measured anticlockwise from the +x frequency axis with
    y up (Kovesi's convention, ``atan2(-fy, fx)``). Filters are one-sided (analytic): the
    response is zero from 90 degrees away (a cosine spread of half-width ``pi / (norient/2)``,
    clamped) and at DC. Each is multiplied by Kovesi's low-pass (radius 0.45, order 15).

    Args:
        shape: image ``(H, W)``.
        nscale: number of scales.
        norient: number of orientations.
        min_wavelength: wavelength of the smallest-scale filter (px).
        mult: wavelength ratio between successive scales.
        sigma_onf: radial bandwidth, sigma / centre frequency of the log-Gaussian.

    Returns:
        (nscale, norient, H, W) float64, read-only (cached per arguments).
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0  # avoids log(0); DC is zeroed below
    theta = np.arctan2(-fy, fx)
    lowpass = 1.0 / (1.0 + (radius / 0.45) ** 30)

    centres = 1.0 / (min_wavelength * mult ** np.arange(nscale))
    radial = np.exp(
        -(np.log(radius / centres[:, None, None]) ** 2) / (2 * math.log(sigma_onf) ** 2)
    )
    radial *= lowpass
    radial[:, 0, 0] = 0.0

    angles = np.arange(norient) * math.pi / norient
    dtheta = np.abs(np.angle(np.exp(1j * (theta[None] - angles[:, None, None]))))
    spread = (np.cos(np.minimum(dtheta * norient / 2, math.pi)) + 1) / 2

    bank = radial[:, None] * spread[None]
    bank.setflags(write=False)
    return bank


def phase_congruency(image: np.ndarray, config: RIFTConfig = RIFTConfig()) -> PhaseCongruency:
    """Kovesi's phase congruency (PC_2, phasecong3) with noise compensation.

    Per orientation: energy ``sum_s [A_s cos(dphi_s) - |A_s sin(dphi_s)|]`` minus the noise
    threshold ``T`` (Rayleigh statistics of the smallest scale, median estimate), weighted by
    the frequency-spread sigmoid and divided by the summed amplitude; the moments are the
    eigenvalues of the covariance of the per-orientation PC vectors.

    Args:
        image: (H, W) gray image, any float scale (0..255 like RIFT).
        config: filter bank and noise-compensation settings.

    Returns:
        :class:`PhaseCongruency` (float64 maps).
    """
    bank = log_gabor_bank(
        image.shape,
        config.nscale,
        config.norient,
        config.min_wavelength,
        config.mult,
        config.sigma_onf,
    )
    eo = np.fft.ifft2(np.fft.fft2(image.astype(np.float64)) * bank)  # (S, O, H, W)
    even, odd = eo.real, eo.imag
    amp = np.abs(eo)
    sum_amp = amp.sum(0)  # (O, H, W)
    sum_even, sum_odd = even.sum(0), odd.sum(0)
    norm = np.hypot(sum_even, sum_odd) + _EPS
    mean_e, mean_o = sum_even / norm, sum_odd / norm
    energy = (even * mean_e + odd * mean_o - np.abs(even * mean_o - odd * mean_e)).sum(0)
    del eo, even, odd

    # noise: smallest-scale amplitudes are Rayleigh; larger scales add a geometric series
    tau = np.median(amp[0].reshape(config.norient, -1), axis=1) / math.sqrt(math.log(4))
    total_tau = tau * (1 - (1 / config.mult) ** config.nscale) / (1 - 1 / config.mult)
    threshold = total_tau * (math.sqrt(math.pi / 2) + config.k * math.sqrt((4 - math.pi) / 2))
    energy = np.maximum(energy - threshold[:, None, None], 0)

    width = (sum_amp / (amp.max(0) + _EPS) - 1) / (config.nscale - 1)
    weight = 1 / (1 + np.exp((config.cut_off - width) * config.g))
    pc = weight * energy / (sum_amp + _EPS)  # (O, H, W)

    angles = np.arange(config.norient) * math.pi / config.norient
    cx = pc * np.cos(angles)[:, None, None]
    cy = pc * np.sin(angles)[:, None, None]
    covx2 = (cx**2).sum(0) / (config.norient / 2)
    covy2 = (cy**2).sum(0) / (config.norient / 2)
    covxy = 4 * (cx * cy).sum(0) / config.norient
    denom = np.sqrt(covxy**2 + (covx2 - covy2) ** 2) + _EPS
    return PhaseCongruency(
        max_moment=(covx2 + covy2 + denom) / 2,
        min_moment=(covx2 + covy2 - denom) / 2,
        amplitude=sum_amp,
    )


def maximum_index_map(amplitude: np.ndarray) -> np.ndarray:
    """The MIM: per pixel, the orientation index with the largest amplitude.

    Args:
        amplitude: (O, H, W) amplitudes summed over scales.

    Returns:
        (H, W) int64 in ``[0, O)``.
    """
    return np.argmax(amplitude, axis=0)


def _normalise(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def detect_points(
    max_moment: np.ndarray,
    min_moment: np.ndarray,
    fast_threshold: float = 0.05,
    corner_threshold: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """RIFT's edge + corner points, strongest first.

    Edge points: FAST (9/16, non-maximum suppression) on ``M`` scaled to 0..255, contrast
    ``fast_threshold * 255``. Corner points: 3x3 local maxima of normalised ``m`` above
    ``corner_threshold``. A pixel found by both counts once, with the larger strength.

    Args:
        max_moment: (H, W) maximum moment of phase congruency.
        min_moment: (H, W) minimum moment of phase congruency.
        fast_threshold: FAST contrast, as a fraction of the normalised ``M`` range.
        corner_threshold: smallest normalised ``m`` of a corner point.

    Returns:
        ``xy`` (N, 2) int64 pixel coordinates ``(x, y)`` and ``strength`` (N,) float64 in
        [0, 1], sorted by decreasing strength (ties in raster order).
    """
    width = max_moment.shape[1]
    edge_map = _normalise(max_moment)
    corner_map = _normalise(min_moment)

    fast = cv2.FastFeatureDetector_create(
        threshold=max(1, round(fast_threshold * 255)), nonmaxSuppression=True
    )
    kps = fast.detect(np.round(edge_map * 255).astype(np.uint8))
    edge_xy = np.round([kp.pt for kp in kps]).astype(np.int64).reshape(-1, 2)
    edge_idx = edge_xy[:, 1] * width + edge_xy[:, 0]

    peaks = (corner_map == cv2.dilate(corner_map, np.ones((3, 3), np.uint8))) & (
        corner_map > corner_threshold
    )
    corner_idx = np.flatnonzero(peaks)

    idx = np.concatenate([edge_idx, corner_idx])
    strength = np.concatenate([edge_map.ravel()[edge_idx], corner_map.ravel()[corner_idx]])
    order = np.lexsort((idx, -strength))
    idx, strength = idx[order], strength[order]
    _, first = np.unique(idx, return_index=True)  # first occurrence = strongest
    keep = np.sort(first)
    idx, strength = idx[keep], strength[keep]
    xy = np.stack([idx % width, idx // width], axis=1)
    return xy, strength


@functools.lru_cache(maxsize=8)
def frame_offsets(patch_size: int, grid: int, norient: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets of the descriptor patch in each of the ``2 * norient`` frames, and cell ids.

    The patch is RIFT's ``(P+1) x (P+1)`` square of offsets ``-P/2 .. P/2`` split into
    ``grid`` x ``grid`` near-equal cells. Frame ``f`` turns it by ``f * pi / norient``: the
    patch x axis points along ``(cos a, -sin a)`` in the image (x right, y down) and the patch
    y axis along ``(sin a, cos a)``, a proper rotation. Offsets are rounded half-to-even, so
    frames ``norient / 2`` apart are exact 90-degree rotations of each other.

    Returns:
        ``offsets`` (2 * norient, M, 2) int64 ``(dx, dy)`` and ``cells`` (M,) int64 (row-major
        cell index), with ``M = (P + 1)**2``; read-only (cached).
    """
    half = patch_size // 2
    d = np.arange(-half, half + 1)
    cell_1d = np.minimum((d + half + 0.5) * grid // (2 * half + 1), grid - 1).astype(np.int64)
    u, v = (a.ravel().astype(np.float64) for a in np.meshgrid(d, d, indexing="xy"))
    cu, cv = np.meshgrid(cell_1d, cell_1d, indexing="xy")
    angles = np.arange(2 * norient) * math.pi / norient
    c, s = np.cos(angles)[:, None], np.sin(angles)[:, None]
    dx, dy = c * u + s * v, -s * u + c * v
    offsets = np.rint(np.round(np.stack([dx, dy], -1), 9)).astype(np.int64)
    cells = (cv * grid + cu).ravel()
    offsets.setflags(write=False)
    cells.setflags(write=False)
    return offsets, cells


def _disc_offsets(radius: int) -> np.ndarray:
    """(M, 2) integer offsets ``(dx, dy)`` within ``radius`` of the origin."""
    d = np.arange(-radius, radius + 1)
    u, v = np.meshgrid(d, d, indexing="xy")
    inside = u**2 + v**2 <= radius**2
    return np.stack([u[inside], v[inside]], 1)


class _Padded(NamedTuple):
    """A map padded by ``pad`` on every side, for gathers by flat index without bounds checks."""

    flat: np.ndarray
    width: int
    pad: int

    @classmethod
    def of(cls, image: np.ndarray, pad: int, fill: float) -> _Padded:
        padded = np.pad(image, pad, constant_values=fill)
        return cls(padded.ravel(), padded.shape[1], pad)

    def index(self, xy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """(N, M) flat indices of points ``xy`` (N, 2) plus ``offsets`` (M, 2) or (N, M, 2)."""
        base = (xy[:, 1] + self.pad) * self.width + xy[:, 0] + self.pad
        return base[:, None] + offsets[..., 1] * self.width + offsets[..., 0]


def dominant_frames(
    mim: np.ndarray,
    max_moment: np.ndarray,
    xy: np.ndarray,
    norient: int,
    radius: int,
    chunk: int = 256,
) -> np.ndarray:
    """Per-point patch frame for ``rotation="dominant_index"``.

    The dominant index ``w`` is the mode of the MIM over a disc of ``radius`` around the point;
    the frame is ``w`` (patch x axis along filter ``w``'s direction) or ``w + norient`` (the
    opposite direction), whichever has the ``M``-weighted centroid of the disc on its positive
    x side.

    Args:
        mim: (H, W) maximum index map.
        max_moment: (H, W) maximum moment of phase congruency.
        xy: (N, 2) int pixel positions ``(x, y)``.
        norient: number of orientations (MIM values).
        radius: disc radius (px), half the patch size.
        chunk: points processed at once (bounds memory).

    Returns:
        (N,) int64 frame ids in ``[0, 2 * norient)``; ``frame % norient`` is ``w``.
    """
    disc = _disc_offsets(radius)
    mims = _Padded.of(mim, radius, norient)  # value ``norient`` marks "outside the image"
    moments = _Padded.of(max_moment, radius, 0.0)
    index = np.zeros(len(xy), np.int64)
    centroid = np.zeros((len(xy), 2))
    for start in range(0, len(xy), chunk):
        sl = slice(start, start + chunk)
        n = len(xy[sl])
        idx = mims.index(xy[sl], disc)  # (n, M); both maps share the padded layout
        hist = np.bincount(
            (np.arange(n)[:, None] * (norient + 1) + mims.flat[idx]).ravel(),
            minlength=n * (norient + 1),
        ).reshape(n, norient + 1)
        index[sl] = np.argmax(hist[:, :norient], axis=1)
        centroid[sl] = moments.flat[idx] @ disc.astype(np.float64)
    angle = index * math.pi / norient
    along = centroid[:, 0] * np.cos(angle) - centroid[:, 1] * np.sin(angle)
    return np.where(along < 0, index + norient, index)


def mim_descriptors(
    mim: np.ndarray,
    xy: np.ndarray,
    norient: int,
    patch_size: int = 96,
    grid: int = 6,
    frames: np.ndarray | None = None,
    chunk: int = 256,
) -> np.ndarray:
    """RIFT descriptors: per-cell MIM histograms of the patch around each point.

    Without ``frames`` the patch is axis-aligned and the MIM used as is (RIFT's released code).
    With them, point ``n``'s patch is turned to frame ``frames[n]`` (see :func:`frame_offsets`)
    and its values re-indexed as ``(MIM - frames[n]) mod norient``. Pixels outside the image
    are not counted.

    Args:
        mim: (H, W) int maximum index map with values in ``[0, norient)``.
        xy: (N, 2) int pixel positions ``(x, y)``.
        norient: number of orientations (histogram bins).
        patch_size: patch side P; the patch spans offsets ``-P/2 .. P/2``.
        grid: cells per patch side.
        frames: optional (N,) int frame ids in ``[0, 2 * norient)``.
        chunk: points processed at once (bounds memory).

    Returns:
        (N, grid * grid * norient) float32, L2-normalised; layout (cell row, cell col, bin).
    """
    offsets, cells = frame_offsets(patch_size, grid, norient)
    padded = _Padded.of(mim, int(np.abs(offsets).max()), norient)
    nbin = norient + 1  # the last bin collects pixels outside the image and is dropped
    ncell = grid * grid
    # relabel[f, v]: value v re-indexed for frame f; the outside label stays last
    relabel = np.concatenate(
        [
            (np.arange(norient)[None] - np.arange(2 * norient)[:, None]) % norient,
            np.full((2 * norient, 1), norient),
        ],
        axis=1,
    )
    out = np.zeros((len(xy), ncell, norient), np.float32)
    for start in range(0, len(xy), chunk):
        sl = slice(start, start + chunk)
        n = len(xy[sl])
        if frames is None:
            values = padded.flat[padded.index(xy[sl], offsets[0])]
        else:
            values = padded.flat[padded.index(xy[sl], offsets[frames[sl]])]
            values = relabel[frames[sl, None], values]
        bins = (np.arange(n)[:, None] * ncell + cells[None]) * nbin + values
        hist = np.bincount(bins.ravel(), minlength=n * ncell * nbin).reshape(n, ncell, nbin)
        out[sl] = hist[..., :norient]
    out = out.reshape(len(xy), ncell * norient)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 HxW or HxWx3 (RGB) -> (H, W) float64 in 0..255."""
    if (
        image.dtype != np.uint8
        or image.ndim not in (2, 3)
        or (image.ndim == 3 and image.shape[2] != 3)
    ):
        raise ValueError(
            f"RIFT expects a uint8 HxW or HxWx3 image, got dtype {image.dtype} shape {image.shape}"
        )
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return gray.astype(np.float64)


class RIFT:
    """RIFT extractor: ``rift(image, max_keypoints) -> Features`` (see the module docstring)."""

    name = "rift"

    def __init__(self, config: RIFTConfig = RIFTConfig()) -> None:
        """Keep ``config``; ``cache_key`` spells out every setting."""
        self.config = config
        c = config
        self.cache_key = (
            f"rift-v1-s{c.nscale}o{c.norient}w{c.min_wavelength:g}m{c.mult:g}b{c.sigma_onf:g}"
            f"k{c.k:g}c{c.cut_off:g}g{c.g:g}-p{c.patch_size}x{c.grid}"
            f"-fast{c.fast_threshold:g}-corner{c.corner_threshold:g}-rot_{c.rotation}"
        )

    def __call__(self, image: np.ndarray, max_keypoints: int = 4096) -> Features:
        """Detect and describe.

        Args:
            image: uint8 (H, W) or (H, W, 3) RGB.
            max_keypoints: K, the most points returned.

        Returns:
            :class:`Features`: keypoints (N, 2) float32 ``(x, y)``, scores (N,) float32 (the
            normalised moment value), descriptors (N, grid^2 * norient) float32, N <= K,
            sorted by decreasing score.
        """
        if max_keypoints < 0:
            raise ValueError(f"max_keypoints must be >= 0, got {max_keypoints}")
        c = self.config
        pc = phase_congruency(to_gray(image), c)
        xy, strength = detect_points(
            pc.max_moment, pc.min_moment, c.fast_threshold, c.corner_threshold
        )
        xy, strength = xy[:max_keypoints], strength[:max_keypoints]
        mim = maximum_index_map(pc.amplitude)
        frames = None
        if c.rotation == "dominant_index":
            frames = dominant_frames(mim, pc.max_moment, xy, c.norient, c.patch_size // 2)
        desc = mim_descriptors(mim, xy, c.norient, c.patch_size, c.grid, frames)
        return Features(xy.astype(np.float32), strength.astype(np.float32), desc)


@BASELINES.register("rift")
def rift(**settings: object) -> RIFT:
    """Build the RIFT extractor; ``settings`` override :class:`RIFTConfig` fields."""
    known = {f.name for f in fields(RIFTConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown RIFT setting(s) {unknown}; known: {', '.join(sorted(known))}")
    return RIFT(RIFTConfig(**settings))  # type: ignore[arg-type]
