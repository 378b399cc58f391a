"""Random transforms of the S2 training pairs, batched on the device.

- SSL cascade ``T = Ts . Tr . Tq . Tn . Tb . Ti`` (paper, section II-B): the geometric part
  ``Ts . Tr . Tq`` is one homography per sample (:func:`random_ssl_homographies`), which gives
  the dense ground truth; the photometric part (:func:`photometric_ssl`) inverts gray values
  above a random threshold (Ti), blurs (Tb) and adds Gaussian noise (Tn), in that order.
- SL augmentation (paper, section III-A): random flips (:func:`flip_matrices`) and random
  rotations by 90, 180 or 270 degrees (:func:`random_quarter_turns`, :func:`rot90_matrices`)
  of the whole pair, the same for both images, so the pair stays registered; then, because
  the datasets are pixel-aligned, an offset of the infrared image alone: a random rotation,
  scale and projection (:func:`random_sl_offsets`); and light noise and blur of both images
  (:func:`photometric_sl`).

Homographies map pixel coordinates of the source image to the transformed image (pixel
centres at integers, the :mod:`s2study.geometry` convention), so
``kornia.geometry.transform.warp_perspective(image, H, dsize)`` renders the transformed image.
Every random number comes from the given ``torch.Generator`` (drawn on the generator's device,
then moved), so a generator state gives the same transforms whichever device they go to.

Pure torch, no host-device syncs and few kernels: kornia's ``gaussian_blur2d`` checks a
per-image sigma on the host and its ``get_perspective_transform`` solves a linear system in
about 120 small kernels, so the blur and the corner homography are closed forms here (the
tests compare them with OpenCV and kornia).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from s2study.config.schema import SLAugmentConfig, SSLAugmentConfig


def _rand(shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _sizes(n: int, size: int | Tensor, device) -> Tensor:
    return torch.as_tensor(size, dtype=torch.float32, device=device).expand(n)


def _lerp(lo: float, hi: float, u: Tensor) -> Tensor:
    return lo + (hi - lo) * u


def _matrices(rows: list[list[Tensor | float]], like: Tensor) -> Tensor:
    """(n, 3, 3) from 3x3 nested lists of (n,) tensors or the constants 0 and 1, one stack."""
    const = {0.0: torch.zeros_like(like), 1.0: torch.ones_like(like)}
    entries = [e if isinstance(e, Tensor) else const[e] for r in rows for e in r]
    return torch.stack(entries, -1).view(-1, 3, 3)


def similarity_about(center: Tensor, angle: Tensor, scale: Tensor) -> Tensor:
    """Rotation and isotropic scale about a centre, as homographies.

    Args:
        center: (n, 2) pixel coordinates ``(x, y)``.
        angle: (n,) radians; positive turns clockwise on screen (y points down).
        scale: (n,) scale factors.

    Returns:
        (n, 3, 3) homographies.
    """
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    cx, cy = center.unbind(-1)
    return _matrices([[cos, -sin, cx - cos * cx + sin * cy],
                      [sin, cos, cy - sin * cx - cos * cy],
                      [0.0, 0.0, 1.0]], cos)


def square_to_quad(quad: Tensor) -> Tensor:
    """Homographies mapping the unit square onto quadrilaterals, in closed form.

    The projective square-to-quadrilateral mapping (Heckbert, "Fundamentals of Texture
    Mapping", 1989): no linear solve, so no device sync and few kernels.

    Args:
        quad: (n, 4, 2) images of the corners (0, 0), (1, 0), (1, 1), (0, 1).

    Returns:
        (n, 3, 3) homographies.
    """
    (x0, x1, x2, x3), (y0, y1, y2, y3) = quad[..., 0].unbind(1), quad[..., 1].unbind(1)
    sx, sy = x0 - x1 + x2 - x3, y0 - y1 + y2 - y3
    dx1, dx2, dy1, dy2 = x1 - x2, x3 - x2, y1 - y2, y3 - y2
    den = dx1 * dy2 - dx2 * dy1
    g = (sx * dy2 - dx2 * sy) / den
    h = (dx1 * sy - sx * dy1) / den
    return _matrices([[x1 - x0 + g * x1, x3 - x0 + h * x3, x0],
                      [y1 - y0 + g * y1, y3 - y0 + h * y3, y0],
                      [g, h, 1.0]], x0)


def corner_jitter(jitter: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Quadrangle projection: the homography moving the image corners by ``jitter``.

    Args:
        jitter: (n, 4, 2) corner displacements as fractions of (width, height), for the
            corners top-left, top-right, bottom-right, bottom-left.
        height: (n,) image heights.
        width: (n,) image widths.

    Returns:
        (n, 3, 3) homographies taking the corner ``(0, 0)`` to ``jitter[:, 0] * size`` etc.
    """
    unit = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], device=jitter.device)
    w, h = width - 1, height - 1
    one, zero = torch.ones_like(w), torch.zeros_like(w)
    to_unit = _matrices([[1 / w, zero, zero], [zero, 1 / h, zero], [zero, zero, one]], w)
    from_unit = _matrices([[w, zero, zero], [zero, h, zero], [zero, zero, one]], w)
    return from_unit @ square_to_quad(unit + jitter) @ to_unit


def random_ssl_homographies(
    n: int, height: int | Tensor, width: int | Tensor, cfg: SSLAugmentConfig,
    generator: torch.Generator, device=None,
) -> Tensor:
    """Random geometric SSL transforms ``Ts . Tr . Tq``.

    Args:
        n: number of transforms.
        height: image height, an int or an (n,) tensor (one per sample).
        width: image width, an int or an (n,) tensor.
        cfg: scale range (Ts), rotation in [-rotation_deg, rotation_deg] about the image
            centre (Tr), corner jitter up to ``perspective`` of the size (Tq).
        generator: source of randomness.
        device: device of the result.

    Returns:
        (n, 3, 3) float32 homographies mapping the image onto its transformed copy.
    """
    h, w = _sizes(n, height, device), _sizes(n, width, device)
    u = _rand((n, 10), generator, device)
    center = torch.stack([(w - 1) / 2, (h - 1) / 2], -1)
    scale = _lerp(*cfg.scale, u[:, 0])
    angle = _lerp(-1.0, 1.0, u[:, 1]) * math.radians(cfg.rotation_deg)
    jitter = _lerp(-cfg.perspective, cfg.perspective, u[:, 2:]).view(n, 4, 2)
    ts = similarity_about(center, torch.zeros_like(scale), scale)
    tr = similarity_about(center, angle, torch.ones_like(scale))
    return ts @ tr @ corner_jitter(jitter, h, w)


def random_sl_offsets(
    n: int, height: int | Tensor, width: int | Tensor, cfg: SLAugmentConfig,
    generator: torch.Generator, device=None,
) -> Tensor:
    """Random offsets of the infrared image of aligned SL pairs.

    A rotation in [-rotation_deg, rotation_deg] and a scale in ``cfg.scale`` about the image
    centre, and a corner jitter up to ``perspective`` of the size. The 90/180/270 degree
    rotations are not part of the offset: they turn the whole pair (:func:`rot90_matrices`).

    Args:
        n: number of offsets.
        height: image height, an int or an (n,) tensor (one per sample).
        width: image width, an int or an (n,) tensor.
        cfg: the SL augmentation magnitudes.
        generator: source of randomness.
        device: device of the result.

    Returns:
        (n, 3, 3) float32 homographies mapping the infrared image onto its offset copy.
    """
    h, w = _sizes(n, height, device), _sizes(n, width, device)
    u = _rand((n, 10), generator, device)
    center = torch.stack([(w - 1) / 2, (h - 1) / 2], -1)
    angle = _lerp(-1.0, 1.0, u[:, 0]) * math.radians(cfg.rotation_deg)
    rotate_scale = similarity_about(center, angle, _lerp(*cfg.scale, u[:, 1]))
    jitter = _lerp(-cfg.perspective, cfg.perspective, u[:, 2:10]).view(n, 4, 2)
    return rotate_scale @ corner_jitter(jitter, h, w)


def random_quarter_turns(n: int, prob: float, generator: torch.Generator, device=None) -> Tensor:
    """Random quarter turns: with probability ``prob`` 1, 2 or 3 (equally likely), else 0.

    Args:
        n: number of draws.
        prob: probability of a turn (each of 90, 180, 270 degrees then has ``prob / 3``).
        generator: source of randomness.
        device: device of the result.

    Returns:
        (n,) int64 in {0, 1, 2, 3}: the rotation in multiples of 90 degrees, clockwise on
        screen (:func:`rot90_matrices`).
    """
    u = _rand((n, 2), generator, device)
    turns = 1 + (u[:, 1] * 3).floor().clamp(max=2).long()
    return torch.where(u[:, 0] < prob, turns, 0)


def rot90_matrices(quarter: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Rotations of whole images by multiples of 90 degrees, as homographies.

    Quarter ``k`` turns the image ``k * 90`` degrees clockwise on screen (the convention of
    :func:`similarity_about`) onto its own rotated canvas, as ``torch.rot90(image, -k,
    (-2, -1))`` does: k = 1 maps ``(x, y) -> (H - 1 - y, x)``, k = 2 ``(x, y) -> (W - 1 - x,
    H - 1 - y)``, k = 3 ``(x, y) -> (y, W - 1 - x)``; the rotated image is W x H for odd k.
    The entries are exact integers, so a warp through it copies pixels (up to float32
    rounding in the warp).

    Args:
        quarter: (n,) integers (any, taken modulo 4).
        height: (n,) image heights.
        width: (n,) image widths.

    Returns:
        (n, 3, 3) float32 homographies.
    """
    k = quarter.long().remainder(4)
    odd = k.remainder(2) == 1
    cos = torch.where(odd, 0, 1 - k).float()  # 1, 0, -1, 0
    sin = torch.where(odd, 2 - k, 0).float()  # 0, 1, 0, -1
    w1, h1 = width.to(cos) - 1, height.to(cos) - 1
    # translate the rotated box [0, W-1] x [0, H-1] back onto [0, .) in both coordinates
    tx = -((cos * w1).clamp(max=0) + (-sin * h1).clamp(max=0))
    ty = -((sin * w1).clamp(max=0) + (cos * h1).clamp(max=0))
    return _matrices([[cos, -sin, tx], [sin, cos, ty], [0.0, 0.0, 1.0]], cos)


def rotated_sizes(quarter: Tensor, size: Tensor) -> Tensor:
    """(n, 2) sizes (height, width) of images of ``size`` (n, 2) after ``quarter`` turns."""
    odd = (quarter.long().remainder(2) == 1)[:, None]
    return torch.where(odd, size.flip(-1), size)


def flip_matrices(flip: Tensor, width: Tensor) -> Tensor:
    """Horizontal flips as homographies.

    Args:
        flip: (n,) bool, which samples are flipped.
        width: (n,) image widths.

    Returns:
        (n, 3, 3): ``x -> width - 1 - x`` where flipped, identity elsewhere.
    """
    m = torch.eye(3, device=flip.device).repeat(flip.shape[0], 1, 1)
    m[:, 0, 0] = torch.where(flip, -1.0, 1.0)
    m[:, 0, 2] = torch.where(flip, width.to(m.dtype) - 1, 0.0)
    return m


def add_noise(images: Tensor, std: Tensor, generator: torch.Generator) -> Tensor:
    """``images + std * N(0, 1)``; images (n, C, H, W), std (n,)."""
    noise = torch.randn(images.shape, generator=generator, device=generator.device)
    return images + std.view(-1, 1, 1, 1) * noise.to(images.device)


def blur(images: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Gaussian blur with a per-image ``sigma``, as one separable grouped convolution.

    kornia's ``gaussian_blur2d`` checks a tensor sigma on the host (a device sync), so the
    per-image kernels are built here on the device instead. Borders reflect (as OpenCV's
    default ``BORDER_REFLECT_101``).

    Args:
        images: (n, C, H, W).
        sigma: (n,) standard deviations in pixels, each at most ``max_sigma``.
        max_sigma: sets the kernel radius, ``ceil(3 * max_sigma)``.

    Returns:
        (n, C, H, W) blurred images.
    """
    n, c, h, w = images.shape
    radius = max(1, math.ceil(3 * max_sigma))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma.clamp(min=1e-3).to(images.dtype).view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*C, K)
    flat = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.view(n, c, h, w)


def photometric_ssl(images: Tensor, cfg: SSLAugmentConfig, generator: torch.Generator) -> Tensor:
    """Photometric part of the SSL cascade: Ti, then Tb, then Tn.

    Ti inverts the values above a threshold drawn from ``cfg.invert_threshold``
    (``v -> 1 - v``, a solarize) with probability ``cfg.invert_prob``; Tb blurs with sigma
    ``cfg.blur_sigma``; Tn adds Gaussian noise of std ``cfg.noise_std``.

    Args:
        images: (n, 3, H, W) float in [0, 1].
        cfg: the SSL magnitudes.
        generator: source of randomness (noise, thresholds, which images are inverted).

    Returns:
        (n, 3, H, W) float in [0, 1].
    """
    n = images.shape[0]
    u = _rand((n, 2), generator, images.device)
    threshold = _lerp(*cfg.invert_threshold, u[:, 0]).view(n, 1, 1, 1)
    invert = (u[:, 1] < cfg.invert_prob).view(n, 1, 1, 1)
    out = torch.where(invert & (images > threshold), 1 - images, images)
    if cfg.blur_sigma > 0:
        out = blur(out, torch.full((n,), cfg.blur_sigma, device=images.device), cfg.blur_sigma)
    if cfg.noise_std > 0:
        out = add_noise(out, torch.full((n,), cfg.noise_std, device=images.device), generator)
    return out.clamp(0, 1)


def photometric_sl(images: Tensor, cfg: SLAugmentConfig, generator: torch.Generator) -> Tensor:
    """Light noise and blur of SL images.

    Per image, a blur sigma drawn in [0, ``cfg.blur_sigma``] and a noise std drawn in
    [0, ``cfg.noise_std``].

    Args:
        images: (n, 3, H, W) float in [0, 1].
        cfg: the SL magnitudes.
        generator: source of randomness.

    Returns:
        (n, 3, H, W) float in [0, 1].
    """
    u = _rand((images.shape[0], 2), generator, images.device)
    out = images
    if cfg.blur_sigma > 0:
        out = blur(out, u[:, 0] * cfg.blur_sigma, cfg.blur_sigma)
    if cfg.noise_std > 0:
        out = add_noise(out, u[:, 1] * cfg.noise_std, generator)
    return out.clamp(0, 1)
