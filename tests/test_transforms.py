"""SSL / SL transforms: the returned homographies are where the warp really puts the pixels,
the magnitudes respect the config, and the photometric steps do what they say."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from kornia.geometry.transform import warp_perspective

from s2study.config.schema import SLAugmentConfig, SSLAugmentConfig
from s2study.data.transforms import (
    flip_matrices,
    photometric_sl,
    photometric_ssl,
    random_sl_offsets,
    random_ssl_homographies,
)
from s2study.geometry import warp_points

H, W = 120, 160
# blob centres well inside the image, so every transform keeps most of them in view
BLOBS = torch.tensor([[x, y] for x in (50.0, 80.3, 110.6) for y in (40.0, 60.5, 80.8)])
SIGMA = 1.5


def blob_image(points: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W) image of Gaussian blobs at ``points`` (P, 2)."""
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                            torch.arange(W, dtype=torch.float32), indexing="ij")
    d2 = (xs[None] - points[:, 0, None, None]) ** 2 + (ys[None] - points[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * SIGMA**2)).sum(0)[None, None]


def local_centroids(image: torch.Tensor, near: torch.Tensor, radius: int = 6) -> torch.Tensor:
    """Intensity centroid of ``image`` (H, W) in a window around each point of ``near``."""
    out = []
    for x, y in near.round().long().tolist():
        win = image[y - radius: y + radius + 1, x - radius: x + radius + 1]
        ys, xs = torch.meshgrid(torch.arange(y - radius, y + radius + 1, dtype=torch.float32),
                                torch.arange(x - radius, x + radius + 1, dtype=torch.float32),
                                indexing="ij")
        out.append(torch.stack([(win * xs).sum(), (win * ys).sum()]) / win.sum())
    return torch.stack(out)


def check_homographies_match_warp(hs: torch.Tensor) -> int:
    """Warp the blob image with each homography; blob centroids must land on ``H(p)``."""
    image = blob_image(BLOBS)
    checked = 0
    for h in hs:
        warped = warp_perspective(image, h[None], (H, W), align_corners=True)[0, 0]
        target = warp_points(h, BLOBS)
        inside = ((target[:, 0] > 10) & (target[:, 0] < W - 11)
                  & (target[:, 1] > 10) & (target[:, 1] < H - 11))
        if not inside.any():
            continue
        found = local_centroids(warped, target[inside])
        # the isolated blob only spreads a little under the local warp: sub-pixel agreement
        assert (found - target[inside]).norm(dim=-1).max() < 0.15, (h, found, target[inside])
        checked += int(inside.sum())
    return checked


def test_ssl_homographies_move_points_where_the_warp_puts_them():
    gen = torch.Generator().manual_seed(0)
    cfg = SSLAugmentConfig(scale=(0.8, 1.2), rotation_deg=30, perspective=0.15)
    hs = random_ssl_homographies(24, H, W, cfg, gen)
    assert hs.shape == (24, 3, 3) and hs.dtype == torch.float32
    assert check_homographies_match_warp(hs) > 24 * 4


def test_sl_offsets_move_points_where_the_warp_puts_them():
    gen = torch.Generator().manual_seed(1)
    cfg = SLAugmentConfig(rot90_prob=0.5)
    hs = random_sl_offsets(24, torch.full((24,), H), torch.full((24,), W), cfg, gen)
    assert check_homographies_match_warp(hs) > 24 * 4


def test_warp_matches_opencv_convention():
    """kornia's warp with our homography equals cv2.warpPerspective (both centre pixels at
    integers), so the homography means the same in every tool of the project."""
    gen = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.random((H, W)).astype(np.float32), (0, 0), 2)
    for h in random_ssl_homographies(4, H, W, SSLAugmentConfig(), gen):
        ours = warp_perspective(torch.from_numpy(image)[None, None], h[None], (H, W),
                                align_corners=True)[0, 0].numpy()
        ref = cv2.warpPerspective(image, h.double().numpy(), (W, H), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT)
        interior = cv2.erode((ref != 0).astype(np.uint8), np.ones((5, 5))) > 0
        assert interior.mean() > 0.2
        assert np.abs(ours - ref)[interior].max() < 2e-3


def _decompose(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation angle (degrees) and scale of similarity homographies (n, 3, 3)."""
    angle = torch.rad2deg(torch.atan2(h[:, 1, 0], h[:, 0, 0]))
    scale = torch.linalg.det(h[:, :2, :2]).sqrt()
    return angle, scale


def test_ssl_magnitudes_follow_config():
    gen = torch.Generator().manual_seed(3)
    cfg = SSLAugmentConfig(scale=(0.9, 1.1), rotation_deg=20, perspective=0.0)
    h = random_ssl_homographies(200, H, W, cfg, gen)
    angle, scale = _decompose(h)
    assert angle.abs().max() <= 20 + 1e-3 and angle.abs().max() > 18
    assert 0.9 - 1e-4 <= scale.min() and scale.max() <= 1.1 + 1e-4
    centre = torch.tensor([[(W - 1) / 2, (H - 1) / 2]])
    # scale and rotation are about the image centre
    torch.testing.assert_close(warp_points(h, centre.expand(200, 1, 2)),
                               centre.expand(200, 1, 2), atol=1e-3, rtol=0)
    quad = SSLAugmentConfig(scale=(1, 1), rotation_deg=0, perspective=0.1)
    corners = torch.tensor([[0.0, 0.0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]])
    moved = warp_points(random_ssl_homographies(100, H, W, quad, gen), corners.expand(100, 4, 2))
    shift = (moved - corners).abs() / torch.tensor([W - 1, H - 1])
    assert shift.max() <= 0.1 + 1e-4 and shift.max() > 0.09


def test_sl_rot90_and_flips():
    gen = torch.Generator().manual_seed(4)
    cfg = SLAugmentConfig(rotation_deg=0, scale=(1, 1), perspective=0, rot90_prob=1.0)
    angle, _ = _decompose(random_sl_offsets(300, H, W, cfg, gen))
    quarters = torch.round(angle / 90).remainder(4)
    assert set(quarters.tolist()) == {1.0, 2.0, 3.0}
    assert torch.allclose(angle, torch.round(angle / 90) * 90, atol=1e-3)
    none = SLAugmentConfig(rotation_deg=0, scale=(1, 1), perspective=0, rot90_prob=0.0)
    torch.testing.assert_close(random_sl_offsets(5, H, W, none, gen), torch.eye(3).expand(5, 3, 3))
    f = flip_matrices(torch.tensor([True, False]), torch.tensor([10.0, 10.0]))
    pts = torch.tensor([[0.0, 3.0], [9.0, 4.0]])
    torch.testing.assert_close(warp_points(f[0], pts), torch.tensor([[9.0, 3.0], [0.0, 4.0]]))
    torch.testing.assert_close(warp_points(f[1], pts), pts)


def test_same_seed_same_transforms():
    cfg = SSLAugmentConfig()
    a = random_ssl_homographies(4, H, W, cfg, torch.Generator().manual_seed(7))
    b = random_ssl_homographies(4, H, W, cfg, torch.Generator().manual_seed(7))
    c = random_ssl_homographies(4, H, W, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- photometric


def test_ssl_noise_has_configured_std():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((4, 3, 64, 64), 0.5)
    cfg = SSLAugmentConfig(noise_std=0.1, blur_sigma=0, invert_prob=0)
    out = photometric_ssl(flat, cfg, gen)
    assert abs(out.std().item() - 0.1) < 0.005 and abs(out.mean().item() - 0.5) < 0.005


def test_ssl_blur_matches_opencv_gaussian():
    impulse = torch.zeros(1, 3, 31, 31)
    impulse[..., 15, 15] = 1.0
    cfg = SSLAugmentConfig(noise_std=0, blur_sigma=1.0, invert_prob=0)
    out = photometric_ssl(impulse, cfg, torch.Generator().manual_seed(0))[0, 0].numpy()
    ref = cv2.GaussianBlur(impulse[0, 0].numpy(), (7, 7), 1.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_ssl_inversion_above_threshold(prob):
    ramp = torch.linspace(0, 1, 101).view(1, 1, 1, -1).expand(2, 3, 4, -1).contiguous()
    cfg = SSLAugmentConfig(noise_std=0, blur_sigma=0, invert_prob=prob, invert_threshold=(0.6, 0.6))
    out = photometric_ssl(ramp, cfg, torch.Generator().manual_seed(0))
    expected = torch.where(ramp > 0.6, 1 - ramp, ramp) if prob else ramp
    torch.testing.assert_close(out, expected)


def test_sl_photometric_is_light_and_bounded():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 48, 48, generator=gen)
    cfg = SLAugmentConfig(noise_std=0.02, blur_sigma=0.5)
    out = photometric_sl(images, cfg, gen)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    assert 0 < (out - images).abs().mean() < 0.15
    off = SLAugmentConfig(noise_std=0, blur_sigma=0)
    assert torch.equal(photometric_sl(images, off, gen), images)


def test_rotation_direction_is_clockwise_on_screen():
    """A +90 degree rotation about the centre sends the point right of the centre below it
    (y points down), the convention of :func:`similarity_about`."""
    from s2study.data.transforms import similarity_about

    h = similarity_about(torch.tensor([[10.0, 10.0]]), torch.tensor([math.pi / 2]), torch.ones(1))
    torch.testing.assert_close(warp_points(h[0], torch.tensor([[15.0, 10.0]])),
                               torch.tensor([[10.0, 15.0]]), atol=1e-5, rtol=0)
