"""The S2 training batch: SL pairs and SSL pairs, all cropped, all with a dense ground truth.

For ``B`` samples the batch holds, in this order, ``B`` SL pairs (visible vs offset infrared),
then ``B`` SSL-vis pairs (visible vs its randomly transformed copy) and ``B`` SSL-ir pairs
(infrared vs its transformed copy), each enabled part as a slice in :attr:`S2Batch.parts`.

Every pair is described by its source images, the ground truth ``H0`` between them (the
dataset's homography for SL, identity for SSL) and one pre-crop transform per side
(``Pa``: for SL a flip then a quarter turn, ``R F``; ``Pb``: for SL the same flip and quarter
turn then the offset, ``O R F`` — the pair turns together, so an aligned pair stays aligned up
to the offset ``O``; identity and ``Ts.Tr.Tq`` for SSL).
A crop centre ``c`` is drawn in image A (the best of a few random candidates by share of valid
correspondences); crop A is centred on ``Pa c`` and crop B on ``Pb H0 c``. Each crop is one
bilinear sample of its source image through the composed matrix ``M = K . P`` (``K`` the crop
translation; one batched ``warp_perspective`` per side, no intermediate full-size warped
image), and the ground truth is the crop-to-crop homography ``Mb H0 Ma^-1`` as a flow.
Pixels whose correspondence falls outside crop B, or outside the real extent of either source
image (zero padding), are invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from kornia.geometry.transform import warp_perspective
from torch import Tensor

from s2study.config.schema import SLAugmentConfig, SSLAugmentConfig
from s2study.data.pairs import PairSample
from s2study.data.transforms import (
    flip_matrices,
    photometric_sl,
    photometric_ssl,
    random_quarter_turns,
    random_sl_offsets,
    random_ssl_homographies,
    rot90_matrices,
    rotated_sizes,
)
from s2study.geometry import flow_from_homography, inside_mask, pixel_grid, warp_points

#: random crop-centre candidates per pair, scored on a coarse grid of the crop
CANDIDATES = 8
SCORE_GRID = 8


@dataclass
class S2Batch:
    """One S2 training batch.

    Attributes:
        images_a: (N, 3, C, C) float in [0, 1]; N = B * (1 + ssl_vis + ssl_ir), in the order
            SL, SSL-vis, SSL-ir.
        images_b: (N, 3, C, C) float in [0, 1].
        flow: (N, C, C, 2) absolute flow A -> B (:mod:`s2study.geometry` convention).
        valid: (N, C, C) bool.
        parts: ``{"sl": slice, "ssl_vis": slice, "ssl_ir": slice}``, enabled parts only.
    """

    images_a: Tensor
    images_b: Tensor
    flow: Tensor
    valid: Tensor
    parts: dict[str, slice]


def _translation(offset: Tensor) -> Tensor:
    """(..., 3, 3) translations by ``offset`` (..., 2)."""
    m = torch.zeros(*offset.shape[:-1], 3, 3, device=offset.device, dtype=offset.dtype)
    m[..., 0, 0] = m[..., 1, 1] = m[..., 2, 2] = 1
    m[..., :2, 2] = offset
    return m


def _upload(samples: list[PairSample], device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All images zero-padded onto one canvas and moved to ``device`` in one transfer.

    On CUDA the host buffers are pinned and copied asynchronously (no wait on the GPU queue).

    Returns:
        ``canvas`` (2B, 3, H, W) float in [0, 1] (visible images, then infrared),
        ``size_a`` and ``size_b`` (B, 2) float (height, width), ``h0`` (B, 3, 3) A -> B.
    """
    b = len(samples)
    images = [s.image_a for s in samples] + [s.image_b for s in samples]
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    pin = torch.device(device or "cpu").type == "cuda"
    canvas = torch.zeros((2 * b, height, width, 3), dtype=torch.uint8, pin_memory=pin)
    meta = torch.zeros((2 * b * 2 + b * 9,), dtype=torch.float32, pin_memory=pin)
    host, host_meta = canvas.numpy(), meta.numpy()
    for i, im in enumerate(images):
        host[i, : im.shape[0], : im.shape[1]] = im
    host_meta[: 4 * b] = np.array([im.shape[:2] for im in images]).ravel()
    host_meta[4 * b:] = np.stack([s.homography for s in samples]).ravel()
    canvas = canvas.to(device, non_blocking=pin).permute(0, 3, 1, 2).float().div_(255)
    meta = meta.to(device, non_blocking=pin)
    sizes = meta[: 4 * b].view(2 * b, 2)
    return canvas, sizes[:b], sizes[b:], meta[4 * b:].view(b, 3, 3)


def _candidate_centres(size: Tensor, crop: int, generator: torch.Generator) -> Tensor:
    """(n, K, 2) random points of A, within the range where crop A fits inside A if it can."""
    u = torch.rand((size.shape[0], CANDIDATES, 2), generator=generator, device=generator.device)
    wh = size.flip(-1)[:, None]  # (n, 1, 2) as (width, height)
    half = (crop - 1) / 2
    lo = torch.minimum(torch.full_like(wh, half), (wh - 1) / 2)
    hi = torch.maximum(wh - 1 - half, (wh - 1) / 2)
    return lo + (hi - lo) * u.to(size.device)


def _inverse(m: Tensor) -> Tensor:
    """Inverse of invertible (n, 3, 3) matrices without the error check (a device sync)."""
    return torch.linalg.inv_ex(m)[0]


def _crop_matrices(pa: Tensor, pb: Tensor, h0: Tensor, centre: Tensor, crop: int):
    """Source-to-crop matrices ``Ma``, ``Mb`` and the crop A -> crop B homography.

    Args:
        pa: (..., 3, 3) pre-crop transform of image A.
        pb: (..., 3, 3) pre-crop transform of image B.
        h0: (..., 3, 3) ground truth image A -> image B.
        centre: (..., 2) crop centre in image A.
        crop: crop side C.
    """
    half = (crop - 1) / 2
    # crop A starts on a whole pixel, so it copies pixels without interpolating
    corner_a = (warp_points(pa, centre[..., None, :])[..., 0, :] - half).round()
    corner_b = warp_points(pb @ h0, centre[..., None, :])[..., 0, :] - half
    ma = _translation(-corner_a) @ pa
    mb = _translation(-corner_b) @ pb
    return ma, mb, mb @ h0 @ _inverse(ma)


def _map_grid(homography: Tensor, crop: int) -> Tensor:
    """(n, C, C, 2) images of the crop's pixel grid under ``homography`` (n, 3, 3).

    The grid is separable, so this broadcasts 1-D coordinates instead of multiplying a
    (C*C, 3) matrix: several times faster than :func:`warp_points` on a full grid.
    """
    r = torch.arange(crop, device=homography.device, dtype=torch.float32)
    rows = homography.to(torch.float32)[:, None, None]  # (n, 1, 1, 3, 3)
    out = r.view(1, 1, -1, 1) * rows[..., 0] + (r.view(1, -1, 1, 1) * rows[..., 1] + rows[..., 2])
    return out[..., :2] / out[..., 2:]


def _inside(points: Tensor, size: Tensor) -> Tensor:
    """``inside_mask`` of points (n, ..., 2) with per-sample ``size`` (n, 2) (height, width)."""
    shape = (-1,) + (1,) * (points.dim() - 2)
    return inside_mask(points, size[:, 0].view(shape), size[:, 1].view(shape))


def _best_centres(pa, pb, h0, size_a, size_b, crop: int, generator) -> Tensor:
    """(n, 2) crop centres in A: per pair, the candidate with most valid correspondences.

    Validity is counted on a coarse grid of the crop.
    """
    n = pa.shape[0]
    cand = _candidate_centres(size_a, crop, generator)  # (n, K, 2)

    def per_candidate(t: Tensor) -> Tensor:
        return t[:, None].expand(-1, CANDIDATES, *t.shape[1:]).reshape(n * CANDIDATES, *t.shape[1:])

    h0, size_a, size_b = per_candidate(h0), per_candidate(size_a), per_candidate(size_b)
    ma, _, g = _crop_matrices(per_candidate(pa), per_candidate(pb), h0, cand.reshape(-1, 2), crop)
    step = crop / SCORE_GRID
    grid = pixel_grid(SCORE_GRID, SCORE_GRID, device=pa.device) * step + (step - 1) / 2
    grid = grid.reshape(1, -1, 2).expand(n * CANDIDATES, -1, -1)
    crop_to_a = _inverse(ma)
    ok = _inside(warp_points(crop_to_a, grid), size_a)
    ok &= _inside(warp_points(h0 @ crop_to_a, grid), size_b)
    ok &= inside_mask(warp_points(g, grid), crop, crop)
    best = ok.sum(-1).view(n, CANDIDATES).argmax(-1)
    return cand[torch.arange(n, device=pa.device), best]


def make_s2_batch(
    samples: list[PairSample],
    crop: int,
    sl: SLAugmentConfig,
    ssl: SSLAugmentConfig,
    *,
    ssl_vis: bool,
    ssl_ir: bool,
    generator: torch.Generator,
    device=None,
) -> S2Batch:
    """Build the S2 batch of ``samples``: SL pairs, then SSL-vis and SSL-ir pairs if enabled.

    Args:
        samples: B pairs (images of any size; different sizes across samples are fine).
        crop: side C of the square crops.
        sl: SL offset magnitudes.
        ssl: SSL cascade magnitudes.
        ssl_vis: include the SSL pairs of the visible images.
        ssl_ir: include the SSL pairs of the infrared images.
        generator: every random draw comes from it (same seed, same batch).
        device: where everything after reading the images happens.

    Returns:
        :class:`S2Batch` with N = B * (1 + ssl_vis + ssl_ir) pairs.
    """
    b = len(samples)
    canvas, size_a, size_b, h0_sl = _upload(samples, device)
    dev = canvas.device
    flipped = torch.rand(b, generator=generator, device=generator.device).to(dev)
    flipped = flipped < sl.flip_prob  # the whole SL pair is flipped
    flip, flip_b = flip_matrices(flipped, size_a[:, 1]), flip_matrices(flipped, size_b[:, 1])
    # the whole SL pair turns by the same quarter (0, 90, 180, 270 degrees), after the flip
    quarter = random_quarter_turns(b, sl.rot90_prob, generator, dev)
    turn_a = rot90_matrices(quarter, size_a[:, 0], size_a[:, 1])
    turn_b = rot90_matrices(quarter, size_b[:, 0], size_b[:, 1])
    turned_b = rotated_sizes(quarter, size_b)
    offset = random_sl_offsets(b, turned_b[:, 0], turned_b[:, 1], sl, generator, dev)

    # SL pairs take A from the visible and B from the infrared images (canvas 0..B-1 and
    # B..2B-1); each SSL pair takes both from one image, with H0 = Pa = identity.
    vis, ir = torch.arange(b, device=dev), torch.arange(b, 2 * b, device=dev)
    enabled = (("ssl_vis", vis, ssl_vis), ("ssl_ir", ir, ssl_ir))
    ssl_parts = [(name, src) for name, src, on in enabled if on]
    ssl_src = torch.cat([src for _, src in ssl_parts]) if ssl_parts else vis[:0]
    sizes = torch.cat([size_a, size_b])  # (2B, 2) per canvas image
    n_ssl = len(ssl_src)
    t = random_ssl_homographies(n_ssl, sizes[ssl_src, 0], sizes[ssl_src, 1], ssl, generator, dev)
    eye = torch.eye(3, device=dev).expand(n_ssl, 3, 3)
    src_a, src_b = torch.cat([vis, ssl_src]), torch.cat([ir, ssl_src])
    pa_sl, pb_sl = turn_a @ flip, offset @ turn_b @ flip_b
    h0, pa, pb = torch.cat([h0_sl, eye]), torch.cat([pa_sl, eye]), torch.cat([pb_sl, t])
    sa, sb = sizes[src_a], sizes[src_b]

    centre = _best_centres(pa, pb, h0, sa, sb, crop, generator)
    ma, mb, g = _crop_matrices(pa, pb, h0, centre, crop)
    images_a = warp_perspective(canvas[src_a], ma, (crop, crop), align_corners=True)
    images_b = warp_perspective(canvas[src_b], mb, (crop, crop), align_corners=True)
    flow, valid = flow_from_homography(g, (crop, crop), (crop, crop))
    crop_to_a = _inverse(ma)
    valid &= _inside(_map_grid(crop_to_a, crop), sa) & _inside(_map_grid(h0 @ crop_to_a, crop), sb)

    images_a[:b], images_b[:b] = photometric_sl(
        torch.cat([images_a[:b], images_b[:b]]), sl, generator).split(b)
    if n_ssl:
        images_b[b:] = photometric_ssl(images_b[b:], ssl, generator)
    names = ["sl"] + [name for name, _ in ssl_parts]
    slices = {name: slice(i * b, (i + 1) * b) for i, name in enumerate(names)}
    return S2Batch(images_a, images_b, flow, valid, slices)
