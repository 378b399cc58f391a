"""Matching metrics of the paper (design.md section 2), as pure functions on torch tensors.

For an image pair (A = visible, B = infrared) with ground truth ``G: A -> B`` given as a dense
absolute flow plus validity mask (:mod:`s2study.geometry`; a homography becomes one through
:func:`~s2study.geometry.flow_from_homography`):

1. keep the top-K keypoints of each image by detection score;
2. putative matches = mutual nearest neighbours of the L2-normalised descriptors;
3. **NC** = number of putative matches;
4. **NCM** = putative matches ``(a, b)`` with ``|G(a) - b| <= t`` (t = 3 px by default).
   ``G(a)`` is the flow sampled bilinearly at ``a``; a match whose ``G(a)`` is unknown (``a``
   falls on invalid flow, e.g. it maps outside B) counts in NC but never in NCM;
5. **CMR** = NCM / NC x 100, in percent (0 when NC = 0);
6. **repeatability** = share, in percent, of A's keypoints whose projection lands within t px
   of one of B's keypoints, among A's keypoints that project inside B (0 when none does);
7. **curves** = NCM and CMR for each threshold in 1..10 px.

Dataset-level numbers are means over pairs. Metric names carry the unit and K
(``nc_k1024``, ``ncm@3px_k1024``, ``cmr@3px_k1024``, ``rep@3px_k1024``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from s2study.features import Features
from s2study.geometry import sample_flow

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in range(1, 11))
DEFAULT_THRESHOLD = 3.0


def mutual_nearest_neighbours(desc_a: Tensor, desc_b: Tensor, chunk: int = 1024) -> Tensor:
    """Mutual nearest neighbours by descriptor similarity.

    The nearest neighbour of ``a_i`` is the ``b_j`` with the largest dot product, which for
    L2-normalised descriptors is the one at the smallest L2 distance. Ties go to the lowest
    index, on both sides (as ``argmax``). ``(i, j)`` is a match when ``j`` is the nearest
    neighbour of ``a_i`` and ``i`` that of ``b_j``. The similarity matrix is built ``chunk``
    rows of A at a time (about ``2 * chunk * M`` floats in memory), on the descriptors' device;
    row and column decisions come from the same computed similarities, so the result equals
    that of the full matrix.

    Args:
        desc_a: (N, D) descriptors of image A.
        desc_b: (M, D) descriptors of image B, same dtype and device.
        chunk: rows of A per block.

    Returns:
        (K, 2) long tensor of index pairs ``(i, j)``, sorted by ``i``.
    """
    if desc_a.dim() != 2 or desc_b.dim() != 2 or desc_a.shape[1] != desc_b.shape[1]:
        raise ValueError(
            "expected descriptors (N, D) and (M, D), "
            f"got {tuple(desc_a.shape)} and {tuple(desc_b.shape)}"
        )
    n, m = desc_a.shape[0], desc_b.shape[0]
    device = desc_a.device
    if n == 0 or m == 0:
        return torch.zeros((0, 2), dtype=torch.long, device=device)
    nn_ab = torch.empty(n, dtype=torch.long, device=device)
    best_ba = torch.full((m,), float("-inf"), dtype=desc_a.dtype, device=device)
    nn_ba = torch.zeros(m, dtype=torch.long, device=device)
    b_t = desc_b.t()
    for start in range(0, n, chunk):
        sim = desc_a[start : start + chunk] @ b_t
        nn_ab[start : start + chunk] = sim.max(dim=1).indices
        # A max over contiguous rows of the transposed block is several times faster than
        # an index-returning max over dim 0.
        col_best, col_idx = sim.t().contiguous().max(dim=1)
        better = col_best > best_ba  # strict: an earlier block keeps ties (lowest index)
        best_ba = torch.where(better, col_best, best_ba)
        nn_ba = torch.where(better, col_idx + start, nn_ba)
    rows = torch.arange(n, device=device)
    mutual = nn_ba[nn_ab] == rows
    return torch.stack([rows[mutual], nn_ab[mutual]], dim=1)


def project_keypoints(xy: Tensor, flow: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Ground truth ``G(a)`` of keypoints of A.

    Args:
        xy: (N, 2) keypoints ``(x, y)`` in A.
        flow: (H_a, W_a, 2) absolute flow A -> B.
        valid: (H_a, W_a) bool, False where the mapping is unknown or leaves B.

    Returns:
        ``mapped`` (N, 2) positions in B and ``known`` (N,) bool (see
        :func:`s2study.geometry.sample_flow`).
    """
    return sample_flow(flow, valid, xy.to(flow.dtype))


def match_errors(
    xy_a: Tensor, xy_b: Tensor, matches: Tensor, flow: Tensor, valid: Tensor
) -> Tensor:
    """Reprojection error ``|G(a) - b|`` of each match, ``inf`` where ``G(a)`` is unknown.

    Args:
        xy_a: (N, 2) keypoints of A; xy_b: (M, 2) keypoints of B.
        matches: (K, 2) long index pairs into ``xy_a`` and ``xy_b``.
        flow: (H_a, W_a, 2) flow A -> B; valid: (H_a, W_a) bool.

    Returns:
        (K,) float errors in B's pixels.
    """
    mapped, known = project_keypoints(xy_a[matches[:, 0]], flow, valid)
    err = (mapped - xy_b[matches[:, 1]].to(mapped.dtype)).norm(dim=1)
    return torch.where(known, err, torch.full_like(err, float("inf")))


def has_neighbour(points: Tensor, targets: Tensor, radius: float, block: int = 1 << 20) -> Tensor:
    """For each point, whether some target lies within ``radius`` (Euclidean, inclusive).

    A band join: targets sorted by x, each point compares only the targets whose x is within
    ``radius`` of its own, in blocks of about ``block`` point-target pairs.

    Args:
        points: (N, 2); targets: (M, 2), same dtype and device.
        radius: distance in pixels.

    Returns:
        (N,) bool.
    """
    n, m = points.shape[0], targets.shape[0]
    if n == 0 or m == 0:
        return torch.zeros(n, dtype=torch.bool, device=points.device)
    sorted_t = targets[targets[:, 0].argsort()]
    xs = sorted_t[:, 0].contiguous()
    reach = radius * (1 + 1e-6) + 1e-6  # a slightly wide band; the exact test below decides
    lo = torch.searchsorted(xs, points[:, 0] - reach)
    hi = torch.searchsorted(xs, points[:, 0] + reach, right=True)
    width = int((hi - lo).max())
    if width == 0:
        return torch.zeros(n, dtype=torch.bool, device=points.device)
    offsets = torch.arange(width, device=points.device)
    rows = max(1, block // width)
    hits = []
    for s in range(0, n, rows):
        idx = lo[s : s + rows, None] + offsets
        in_band = idx < hi[s : s + rows, None]
        near = (sorted_t[idx.clamp(max=m - 1)] - points[s : s + rows, None]).norm(dim=-1) <= radius
        hits.append((near & in_band).any(dim=1))
    return torch.cat(hits)


def repeatability(
    xy_a: Tensor, xy_b: Tensor, flow: Tensor, valid: Tensor, threshold: float = DEFAULT_THRESHOLD
) -> Tensor:
    """Percentage of A's keypoints projecting within ``threshold`` px of one of B's keypoints.

    Only A's keypoints that project inside B (known ``G(a)``) are counted; 0 when there are none.

    Args:
        xy_a: (N, 2) keypoints of A; xy_b: (M, 2) keypoints of B.
        flow: (H_a, W_a, 2) flow A -> B; valid: (H_a, W_a) bool.
        threshold: pixel distance in B.

    Returns:
        0-dim float tensor in [0, 100].
    """
    mapped, known = project_keypoints(xy_a, flow, valid)
    points = mapped[known]
    if points.shape[0] == 0:
        return torch.zeros((), dtype=flow.dtype, device=flow.device)
    hits = has_neighbour(points, xy_b.to(points.dtype), threshold)
    return hits.sum() * 100.0 / points.shape[0]


@dataclass(frozen=True)
class PairMetrics:
    """Metrics of one image pair at one K.

    Attributes:
        k: keypoints kept per image; num_a / num_b: keypoints actually kept (<= k).
        nc, ncm, cmr, repeatability: at ``threshold`` px (cmr and repeatability in percent).
        threshold: the main threshold in px.
        thresholds: the curve's thresholds in px; ncm_curve / cmr_curve: one value each.
    """

    k: int
    num_a: int
    num_b: int
    nc: int
    ncm: int
    cmr: float
    repeatability: float
    threshold: float
    thresholds: tuple[float, ...]
    ncm_curve: tuple[int, ...]
    cmr_curve: tuple[float, ...]


def pair_metrics(
    kp_a: Features,
    kp_b: Features,
    flow: Tensor,
    valid: Tensor,
    k: int,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    main_threshold: float = DEFAULT_THRESHOLD,
) -> PairMetrics:
    """NC, NCM, CMR, repeatability and the NCM/CMR curves of one pair (module docstring).

    Args:
        kp_a, kp_b: keypoints of A and B sorted by decreasing score (``xy`` (N, 2),
            ``descriptors`` (N, D) L2-normalised); the first ``k`` of each are used.
        flow: (H_a, W_a, 2) ground-truth flow A -> B in B's pixels; for a homography ``H``
            pass ``flow_from_homography(H, shape_a, shape_b)``.
        valid: (H_a, W_a) bool.
        k: keypoints per image (K > 0).
        thresholds: pixel thresholds of the curves.
        main_threshold: the threshold of ``ncm``, ``cmr`` and ``repeatability``.

    Returns:
        :class:`PairMetrics`; the only host synchronisation is the final read-out.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    a, b = kp_a.top(k), kp_b.top(k)
    matches = mutual_nearest_neighbours(a.descriptors, b.descriptors.to(a.descriptors))
    err = match_errors(a.xy, b.xy, matches, flow, valid)
    levels = torch.tensor([main_threshold, *thresholds], dtype=err.dtype, device=err.device)
    ncm = (err[None, :] <= levels[:, None]).sum(dim=1)
    rep = repeatability(a.xy, b.xy, flow, valid, main_threshold)
    ncm_all = ncm.tolist()
    nc = int(matches.shape[0])
    cmr = [100.0 * c / nc if nc else 0.0 for c in ncm_all]
    return PairMetrics(
        k=k,
        num_a=len(a),
        num_b=len(b),
        nc=nc,
        ncm=ncm_all[0],
        cmr=cmr[0],
        repeatability=float(rep),
        threshold=float(main_threshold),
        thresholds=tuple(float(t) for t in thresholds),
        ncm_curve=tuple(ncm_all[1:]),
        cmr_curve=tuple(cmr[1:]),
    )


def threshold_tag(threshold: float) -> str:
    """``3.0 -> '3px'``, ``2.5 -> '2.5px'``."""
    return f"{threshold:g}px"


def metric_name(metric: str, k: int, threshold: float | None = None) -> str:
    """Named metric with unit and K: ``('ncm', 1024, 3) -> 'ncm@3px_k1024'``,
    ``('nc', 1024) -> 'nc_k1024'``."""
    at = f"@{threshold_tag(threshold)}" if threshold is not None else ""
    return f"{metric}{at}_k{k}"


@dataclass(frozen=True)
class MeanMetrics:
    """Means over the pairs of a dataset at one K (fields as in :class:`PairMetrics`)."""

    k: int
    num_pairs: int
    nc: float
    ncm: float
    cmr: float
    repeatability: float
    threshold: float
    thresholds: tuple[float, ...]
    ncm_curve: tuple[float, ...]
    cmr_curve: tuple[float, ...]

    def as_dict(self) -> dict[str, float]:
        """Named metrics: ``nc_k1024``, ``ncm@3px_k1024``, ``cmr@3px_k1024``,
        ``rep@3px_k1024``, and ``ncm@Tpx_k1024`` / ``cmr@Tpx_k1024`` for each curve threshold."""
        out = {
            metric_name("nc", self.k): self.nc,
            metric_name("ncm", self.k, self.threshold): self.ncm,
            metric_name("cmr", self.k, self.threshold): self.cmr,
            metric_name("rep", self.k, self.threshold): self.repeatability,
        }
        for t, ncm, cmr in zip(self.thresholds, self.ncm_curve, self.cmr_curve):
            out[metric_name("ncm", self.k, t)] = ncm
            out[metric_name("cmr", self.k, t)] = cmr
        return out


def mean_metrics(pairs: Sequence[PairMetrics]) -> MeanMetrics:
    """Dataset-level means of per-pair metrics sharing K and thresholds.

    Raises:
        ValueError: no pairs, or pairs computed with different K or thresholds.
    """
    if not pairs:
        raise ValueError("mean_metrics needs at least one pair")
    first = pairs[0]
    for p in pairs:
        if (p.k, p.threshold, p.thresholds) != (first.k, first.threshold, first.thresholds):
            raise ValueError("mean_metrics: pairs differ in K or thresholds")
    n = len(pairs)

    def mean(values) -> float:
        return float(sum(values)) / n

    return MeanMetrics(
        k=first.k,
        num_pairs=n,
        nc=mean(p.nc for p in pairs),
        ncm=mean(p.ncm for p in pairs),
        cmr=mean(p.cmr for p in pairs),
        repeatability=mean(p.repeatability for p in pairs),
        threshold=first.threshold,
        thresholds=first.thresholds,
        ncm_curve=tuple(mean(col) for col in zip(*(p.ncm_curve for p in pairs))),
        cmr_curve=tuple(mean(col) for col in zip(*(p.cmr_curve for p in pairs))),
    )
