"""Ground truth between two images: one representation everywhere.

A correspondence A -> B is a dense *absolute flow*: ``flow[..., y, x, :] = (x_b, y_b)``, the
position in image B (pixels, x right, y down, pixel centres at integers as in OpenCV) of the
pixel ``(x, y)`` of image A, plus a boolean ``valid`` mask that is False where the mapping is
unknown or lands outside B. SL pairs, SSL pairs, every method's loss and every metric use it.

All functions are pure and work on torch tensors (CPU or GPU); shapes are given per argument.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from s2study.errors import DataError


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """(H, W, 2) grid of pixel coordinates ``(x, y)``."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def warp_points(homography: Tensor, points: Tensor) -> Tensor:
    """Apply homographies to points.

    Args:
        homography: (3, 3) or (B, 3, 3).
        points: (N, 2) or (B, N, 2) pixel coordinates ``(x, y)``.

    Returns:
        Points of the same shape as ``points``; points mapped to infinity become ``inf``.
    """
    h = homography.to(points.dtype)
    ones = torch.ones_like(points[..., :1])
    homog = torch.cat([points, ones], dim=-1) @ h.transpose(-1, -2)
    w = homog[..., 2:]
    safe_w = torch.where(w.abs() < 1e-12, torch.full_like(w, 1e-12), w)
    out = homog[..., :2] / safe_w
    return torch.where(w.abs() < 1e-12, torch.full_like(out, float("inf")), out)


def inside_mask(points: Tensor, height: int, width: int, margin: float = 0.0) -> Tensor:
    """True where ``points`` (..., 2) lie inside an image of ``height`` x ``width``."""
    x, y = points[..., 0], points[..., 1]
    return (
        torch.isfinite(x)
        & torch.isfinite(y)
        & (x >= -0.5 + margin)
        & (y >= -0.5 + margin)
        & (x <= width - 0.5 - margin)
        & (y <= height - 0.5 - margin)
    )


def flow_from_homography(
    homography: Tensor, shape_a: tuple[int, int], shape_b: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Dense flow A -> B of a homography.

    Args:
        homography: (3, 3) or (B, 3, 3) mapping A's pixels onto B's.
        shape_a: (H_a, W_a) of image A.
        shape_b: (H_b, W_b) of image B.

    Returns:
        ``flow`` (H_a, W_a, 2) or (B, H_a, W_a, 2) and ``valid`` of the same shape without
        the last axis (True where the pixel lands inside B).
    """
    h = homography.to(torch.float32)
    batched = h.dim() == 3
    h = h.reshape(-1, 3, 3)[:, :, :, None, None]  # (B, 3, 3, 1, 1): broadcast over the grid
    ys = torch.arange(shape_a[0], device=h.device, dtype=torch.float32)[:, None]
    xs = torch.arange(shape_a[1], device=h.device, dtype=torch.float32)[None, :]
    num_x = h[:, 0, 0] * xs + h[:, 0, 1] * ys + h[:, 0, 2]
    num_y = h[:, 1, 0] * xs + h[:, 1, 1] * ys + h[:, 1, 2]
    w = h[:, 2, 0] * xs + h[:, 2, 1] * ys + h[:, 2, 2]
    at_infinity = w.abs() < 1e-12
    w = torch.where(at_infinity, torch.ones_like(w), w)
    flow = torch.stack([num_x / w, num_y / w], dim=-1)
    flow = torch.where(at_infinity[..., None], torch.full_like(flow, -1e6), flow)
    valid = inside_mask(flow, *shape_b) & ~at_infinity
    return (flow, valid) if batched else (flow[0], valid[0])


def identity_flow(height: int, width: int, device=None) -> tuple[Tensor, Tensor]:
    """Flow of a pixel-aligned pair: every pixel maps onto itself, all valid."""
    return pixel_grid(height, width, device=device), torch.ones(
        height, width, dtype=torch.bool, device=device
    )


def affine_to_homography(matrix: np.ndarray) -> np.ndarray:
    """A 2x3 affine or a 3x3 matrix as a 3x3 homography (float64)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (2, 3):
        m = np.vstack([m, [0.0, 0.0, 1.0]])
    if m.shape != (3, 3):
        raise ValueError(f"expected a 2x3 affine or 3x3 homography, got shape {m.shape}")
    return m


def check_transform(matrix: np.ndarray, source: str) -> np.ndarray:
    """Validate a ground-truth transform read from ``source``; returns it as 3x3 float64.

    Raises:
        DataError: the matrix is malformed, not finite or singular.
    """
    try:
        h = affine_to_homography(matrix)
    except ValueError as exc:
        raise DataError(f"{source}: {exc}") from None
    if not np.all(np.isfinite(h)):
        raise DataError(f"{source}: the transform has non-finite entries")
    if abs(np.linalg.det(h)) < 1e-9 * max(1.0, float(np.abs(h).max()) ** 3):
        raise DataError(f"{source}: the transform is singular (determinant ~ 0)")
    return h / h[2, 2] if abs(h[2, 2]) > 1e-12 else h


def sample_flow(flow: Tensor, valid: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Map points of A into B through a dense flow (bilinear interpolation).

    Args:
        flow: (H, W, 2) absolute flow A -> B.
        valid: (H, W) validity mask.
        points: (N, 2) sub-pixel positions ``(x, y)`` in A.

    Returns:
        ``mapped`` (N, 2) positions in B and ``ok`` (N,) bool: the point lies inside A and
        all four flow samples around it are valid.
    """
    h, w = valid.shape
    if points.numel() == 0:
        return points.new_zeros((0, 2)), torch.zeros(0, dtype=torch.bool, device=points.device)
    x = points[:, 0].clamp(0, w - 1)
    y = points[:, 1].clamp(0, h - 1)
    x0 = x.floor().long().clamp(0, w - 1)
    y0 = y.floor().long().clamp(0, h - 1)
    x1 = (x0 + 1).clamp(max=w - 1)
    y1 = (y0 + 1).clamp(max=h - 1)
    fx = (x - x0.to(x.dtype)).unsqueeze(-1)
    fy = (y - y0.to(y.dtype)).unsqueeze(-1)
    f = flow.to(points.dtype)
    mapped = (
        f[y0, x0] * (1 - fx) * (1 - fy)
        + f[y0, x1] * fx * (1 - fy)
        + f[y1, x0] * (1 - fx) * fy
        + f[y1, x1] * fx * fy
    )
    ok = valid[y0, x0] & valid[y0, x1] & valid[y1, x0] & valid[y1, x1]
    ok &= inside_mask(points, h, w)
    return mapped, ok


def compose_flows(flow_ab: Tensor, valid_ab: Tensor, flow_bc: Tensor, valid_bc: Tensor):
    """Chain A -> B and B -> C flows into A -> C (nearest sampling of the second flow).

    Args:
        flow_ab: (H_a, W_a, 2); valid_ab: (H_a, W_a); flow_bc: (H_b, W_b, 2); valid_bc: (H_b, W_b).

    Returns:
        ``flow_ac`` (H_a, W_a, 2) and ``valid_ac`` (H_a, W_a).
    """
    hb, wb = valid_bc.shape
    xb = flow_ab[..., 0].round().long()
    yb = flow_ab[..., 1].round().long()
    inside = valid_ab & (xb >= 0) & (xb < wb) & (yb >= 0) & (yb < hb)
    xb = xb.clamp(0, wb - 1)
    yb = yb.clamp(0, hb - 1)
    return flow_bc[yb, xb], inside & valid_bc[yb, xb]
