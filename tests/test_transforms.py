"""SSL / SL transforms: the returned homographies are where the warp really puts the pixels,
the magnitudes respect the config, and the photometric steps do what they say."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from kornia.geometry.transform import get_perspective_transform, warp_perspective

from s2study.config.schema import SLAugmentConfig, SSLAugmentConfig
from s2study.data.transforms import (
    blur,
    corner_jitter,
    flip_matrices,
    photometric_sl,
    photometric_ssl,
    random_quarter_turns,
    random_sl_offsets,
    random_ssl_homographies,
    rot90_matrices,
    rotated_sizes,
)
from s2study.geometry import warp_points

H, W = 120, 160
# blob centres well inside the image, so every transform keeps most of them in view
BLOBS = torch.tensor([[x, y] for x in (50.0, 80.3, 110.6) for y in (40.0, 60.5, 80.8)])
SIGMA = 1.5


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    """Same shape and equal within ``atol`` (torch.testing's first call costs seconds)."""
    return a.shape == b.shape and bool((a - b).abs().max() <= atol)


def blob_images(points: torch.Tensor) -> torch.Tensor:
    """(P, 1, H, W): one image per point of ``points`` (P, 2), each a single Gaussian blob."""
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                            torch.arange(W, dtype=torch.float32), indexing="ij")
    d2 = (xs[None] - points[:, 0, None, None]) ** 2 + (ys[None] - points[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * SIGMA**2))[:, None]


def centroids(images: torch.Tensor) -> torch.Tensor:
    """(P, 2) intensity centroids (x, y) of images (P, 1, H, W)."""
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                            torch.arange(W, dtype=torch.float32), indexing="ij")
    mass = images.sum((1, 2, 3))
    moments = torch.stack([(images * xs).sum((1, 2, 3)), (images * ys).sum((1, 2, 3))], -1)
    return moments / mass[:, None]


def check_homographies_match_warp(hs: torch.Tensor) -> int:
    """Warp one-blob images with each homography; each blob's centroid (found without using
    the prediction) must land on ``H(p)``. Returns the number of blobs checked."""
    images = blob_images(BLOBS)
    checked = 0
    for h in hs:
        warped = warp_perspective(images, h.expand(len(BLOBS), 3, 3), (H, W), align_corners=True)
        target = warp_points(h, BLOBS)
        inside = ((target[:, 0] > 10) & (target[:, 0] < W - 11)
                  & (target[:, 1] > 10) & (target[:, 1] < H - 11))
        found = centroids(warped[inside])
        # an isolated blob only spreads a little under the local warp: sub-pixel agreement
        assert (found - target[inside]).norm(dim=-1).max() < 0.1, (h, found, target[inside])
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
    assert close(warp_points(h, centre.expand(200, 1, 2)), centre.expand(200, 1, 2), atol=1e-3)
    quad = SSLAugmentConfig(scale=(1, 1), rotation_deg=0, perspective=0.1)
    corners = torch.tensor([[0.0, 0.0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]])
    moved = warp_points(random_ssl_homographies(100, H, W, quad, gen), corners.expand(100, 4, 2))
    shift = (moved - corners).abs() / torch.tensor([W - 1, H - 1])
    assert shift.max() <= 0.1 + 1e-4 and shift.max() > 0.09


def test_corner_jitter_matches_kornia_solve():
    gen = torch.Generator().manual_seed(5)
    jitter = (torch.rand(20, 4, 2, generator=gen) - 0.5) * 0.8
    hs = corner_jitter(jitter, torch.full((20,), float(H)), torch.full((20,), float(W)))
    corners = torch.tensor([[0.0, 0.0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]]).expand(20, 4, 2)
    moved = corners + jitter * torch.tensor([W - 1.0, H - 1.0])
    assert close(warp_points(hs, corners), moved, atol=1e-3)
    ref = get_perspective_transform(corners, moved)
    assert close(hs / hs[:, 2:, 2:], ref / ref[:, 2:, 2:], atol=1e-4)


def test_sl_offsets_and_flips():
    """The offset is a small rotation only (the 90-degree turns rotate the whole pair, not
    the infrared image), and ``rot90_prob`` does not change it."""
    cfg = SLAugmentConfig(rotation_deg=10, scale=(1, 1), perspective=0, rot90_prob=1.0)
    hs = random_sl_offsets(300, H, W, cfg, torch.Generator().manual_seed(4))
    angle, _ = _decompose(hs)
    assert angle.abs().max() <= 10 + 1e-3 and angle.abs().max() > 9
    upright = SLAugmentConfig(rotation_deg=10, scale=(1, 1), perspective=0, rot90_prob=0.0)
    assert torch.equal(hs, random_sl_offsets(300, H, W, upright, torch.Generator().manual_seed(4)))
    none = SLAugmentConfig(rotation_deg=0, scale=(1, 1), perspective=0)
    assert close(random_sl_offsets(5, H, W, none, torch.Generator()), torch.eye(3).expand(5, 3, 3))
    f = flip_matrices(torch.tensor([True, False]), torch.tensor([10.0, 10.0]))
    pts = torch.tensor([[0.0, 3.0], [9.0, 4.0]])
    assert close(warp_points(f[0], pts), torch.tensor([[9.0, 3.0], [0.0, 4.0]]))
    assert close(warp_points(f[1], pts), pts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quarter_turns_with_probability_one_take_each_turn(seed):
    turns = random_quarter_turns(300, 1.0, torch.Generator().manual_seed(seed))
    assert turns.dtype == torch.int64 and turns.shape == (300,)
    counts = torch.bincount(turns, minlength=4)
    assert counts[0] == 0 and (counts[1:] > 70).all(), counts  # about 100 each
    none = random_quarter_turns(300, 0.0, torch.Generator().manual_seed(seed))
    assert (none == 0).all()
    half = random_quarter_turns(600, 0.5, torch.Generator().manual_seed(seed))
    assert 240 < int((half == 0).sum()) < 360


def test_rot90_matrices_are_torch_rot90():
    """Warping with the quarter-turn homography onto the rotated canvas gives exactly
    ``torch.rot90(image, -k)`` (k turns clockwise on screen), for a non-square image."""
    image = torch.rand(1, 2, H, W, generator=torch.Generator().manual_seed(0))
    quarter = torch.arange(4)
    m = rot90_matrices(quarter, torch.full((4,), float(H)), torch.full((4,), float(W)))
    sizes = rotated_sizes(quarter, torch.tensor([[float(H), float(W)]]).expand(4, 2))
    for k in range(4):
        h, w = (int(v) for v in sizes[k])
        assert (h, w) == ((W, H) if k % 2 else (H, W))
        out = warp_perspective(image, m[k:k + 1], (h, w), align_corners=True)
        assert close(out, torch.rot90(image, -k, (-2, -1)), atol=1e-4), k  # float32 warp
    # k = 1 sends the point right of the centre below it, as similarity_about's +90 degrees
    centre = torch.tensor([[(W - 1) / 2, (H - 1) / 2]])
    right = warp_points(m[1], centre + torch.tensor([[5.0, 0.0]]))
    assert close(right - warp_points(m[1], centre), torch.tensor([[0.0, 5.0]]))


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


def test_blur_per_image_sigma_matches_opencv_with_borders():
    rng = np.random.default_rng(1)
    images = rng.random((3, 2, 20, 24)).astype(np.float32)
    sigmas = [0.5, 1.0, 2.0]
    out = blur(torch.from_numpy(images), torch.tensor(sigmas), max_sigma=2.0).numpy()
    for i, sigma in enumerate(sigmas):
        for c in range(2):
            ref = cv2.GaussianBlur(images[i, c], (13, 13), sigma, borderType=cv2.BORDER_REFLECT_101)
            np.testing.assert_allclose(out[i, c], ref, atol=1e-5)
    same = blur(torch.from_numpy(images), torch.zeros(3), max_sigma=1.0)
    assert close(same, torch.from_numpy(images))


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_ssl_inversion_above_threshold(prob):
    ramp = torch.linspace(0, 1, 101).view(1, 1, 1, -1).expand(2, 3, 4, -1).contiguous()
    cfg = SSLAugmentConfig(noise_std=0, blur_sigma=0, invert_prob=prob, invert_threshold=(0.6, 0.6))
    out = photometric_ssl(ramp, cfg, torch.Generator().manual_seed(0))
    expected = torch.where(ramp > 0.6, 1 - ramp, ramp) if prob else ramp
    assert close(out, expected)


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
    assert close(warp_points(h[0], torch.tensor([[15.0, 10.0]])), torch.tensor([[10.0, 15.0]]))
