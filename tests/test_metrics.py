"""Known-answer and reference tests of s2study.metrics (design.md section 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s2study.features import Features
from s2study.geometry import flow_from_homography, identity_flow
from s2study.metrics import (
    MeanMetrics,
    has_neighbour,
    mean_metrics,
    metric_name,
    mutual_nearest_neighbours,
    pair_metrics,
    repeatability,
)


def brute_force_mnn(desc_a: np.ndarray, desc_b: np.ndarray, block: int = 2048) -> np.ndarray:
    """Reference: float64 similarities, first-occurrence argmax on both sides (numpy)."""
    a, b = desc_a.astype(np.float64), desc_b.astype(np.float64)
    nn_ab = np.concatenate(
        [(a[s : s + block] @ b.T).argmax(axis=1) for s in range(0, len(a), block)]
    )
    nn_ba = np.concatenate(
        [(b[s : s + block] @ a.T).argmax(axis=1) for s in range(0, len(b), block)]
    )
    rows = np.arange(len(a))
    mutual = nn_ba[nn_ab] == rows
    return np.stack([rows[mutual], nn_ab[mutual]], axis=1)


def integer_descriptors(rng: np.random.Generator, n: int, d: int, levels: int) -> np.ndarray:
    """Small-integer descriptors: every dot product is exact in float32, ties are frequent."""
    return rng.integers(-levels, levels + 1, size=(n, d)).astype(np.float32)


# ----------------------------------------------------------------------------- MNN


@pytest.mark.parametrize(
    "n, m, d, levels, chunk",
    [
        (1, 1, 4, 1, 1),
        (7, 300, 8, 1, 3),
        (300, 7, 8, 1, 64),
        (500, 400, 16, 2, 128),
        (257, 513, 3, 1, 1000),
    ],
)
def test_mnn_matches_brute_force_with_ties(n, m, d, levels, chunk):
    rng = np.random.default_rng(n * 1000 + m)
    a, b = integer_descriptors(rng, n, d, levels), integer_descriptors(rng, m, d, levels)
    got = mutual_nearest_neighbours(torch.from_numpy(a), torch.from_numpy(b), chunk=chunk)
    assert got.dtype == torch.long
    np.testing.assert_array_equal(got.numpy(), brute_force_mnn(a, b))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    d=st.integers(1, 6),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 2**31),
)
def test_mnn_property_small_integer_cases(n, m, d, chunk, seed):
    rng = np.random.default_rng(seed)
    a, b = integer_descriptors(rng, n, d, 1), integer_descriptors(rng, m, d, 1)
    got = mutual_nearest_neighbours(torch.from_numpy(a), torch.from_numpy(b), chunk=chunk)
    np.testing.assert_array_equal(got.numpy(), brute_force_mnn(a, b))


def test_mnn_normalised_float_descriptors():
    g = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(2000, 128, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(1500, 128, generator=g), dim=1)
    got = mutual_nearest_neighbours(a, b, chunk=300)
    ref = brute_force_mnn(a.numpy(), b.numpy())
    assert len(ref) > 100
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.slow
def test_mnn_8192_in_chunks_equals_brute_force():
    rng = np.random.default_rng(8192)
    # 32 ternary dimensions: dot products in [-32, 32], so exact ties between candidates are
    # everywhere and only the tie rule decides
    a, b = integer_descriptors(rng, 8192, 32, 1), integer_descriptors(rng, 8192, 32, 1)
    got = mutual_nearest_neighbours(torch.from_numpy(a), torch.from_numpy(b), chunk=1024)
    np.testing.assert_array_equal(got.numpy(), brute_force_mnn(a, b))


def test_mnn_identical_sets_match_everything_and_empty_inputs():
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    got = mutual_nearest_neighbours(d, d[torch.randperm(50, generator=g)], chunk=7)
    assert got.shape == (50, 2)
    assert torch.equal(got[:, 0], torch.arange(50))
    assert mutual_nearest_neighbours(d[:0], d).shape == (0, 2)
    assert mutual_nearest_neighbours(d, d[:0]).shape == (0, 2)
    with pytest.raises(ValueError, match="expected descriptors"):
        mutual_nearest_neighbours(d, d[:, :8])


# ----------------------------------------------------------------------------- pair metrics


def one_hot(indices: list[int], dim: int = 8) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(indices), dim).float()


def keypoints(xy: list[tuple[float, float]], desc: torch.Tensor) -> Features:
    n = len(xy)
    return Features(
        torch.tensor(xy, dtype=torch.float32).reshape(n, 2),
        torch.linspace(1.0, 0.1, n) if n else torch.zeros(0),
        desc,
    )


@pytest.fixture
def homography_case():
    """A: 20x30 (HxW), B: 60x50; G(x, y) = (2x + 10, 2y + 5).

    a0 (1, 1) -> (12, 7)   matches b0 (12, 7):   error 0
    a1 (5, 5) -> (20, 15)  matches b1 (22, 15):  error 2
    a2 (10, 3) -> (30, 11) matches b2 (30, 15):  error 4
    a3 (25, 2) -> (60, 9)  matches b3 (45, 9):   G unknown (outside B, width 50)
    a4 (2, 8) -> (14, 21)  same descriptor as a0: b0's tie goes to a0, so no match;
                           b4 (14.5, 21) lies 0.5 px from G(a4) (repeatable, unmatched)
    """
    h = torch.tensor([[2.0, 0, 10], [0, 2, 5], [0, 0, 1]])
    flow, valid = flow_from_homography(h, (20, 30), (60, 50))
    kp_a = keypoints([(1, 1), (5, 5), (10, 3), (25, 2), (2, 8)], one_hot([0, 1, 2, 3, 0]))
    kp_b = keypoints([(12, 7), (22, 15), (30, 15), (45, 9), (14.5, 21)], one_hot([0, 1, 2, 3, 5]))
    return kp_a, kp_b, flow, valid


def test_homography_case_hand_computed(homography_case):
    kp_a, kp_b, flow, valid = homography_case
    m = pair_metrics(kp_a, kp_b, flow, valid, k=1024)
    assert (m.num_a, m.num_b) == (5, 5)  # fewer than K: all kept
    assert m.nc == 4
    assert m.ncm == 2  # a0 (0 px), a1 (2 px); a2 is 4 px off, a3 unknown
    assert m.cmr == pytest.approx(50.0)
    assert m.repeatability == pytest.approx(75.0)  # a0, a1, a4 of the 4 projecting inside B
    assert m.thresholds == tuple(float(t) for t in range(1, 11))
    assert m.ncm_curve == (1, 2, 2, 3, 3, 3, 3, 3, 3, 3)
    assert m.cmr_curve == pytest.approx([25, 50, 50, 75, 75, 75, 75, 75, 75, 75])


def test_homography_case_top_k_and_threshold(homography_case):
    kp_a, kp_b, flow, valid = homography_case
    m = pair_metrics(kp_a, kp_b, flow, valid, k=3, main_threshold=4.0, thresholds=(0.5, 2.0))
    assert (m.num_a, m.num_b, m.nc, m.ncm) == (3, 3, 3, 3)
    assert m.cmr == pytest.approx(100.0)
    assert m.repeatability == pytest.approx(100.0)
    assert m.ncm_curve == (1, 2)
    m3 = pair_metrics(kp_a, kp_b, flow, valid, k=3)
    assert m3.repeatability == pytest.approx(200 / 3)  # a2's nearest B keypoint is 4 px away


def test_no_keypoints():
    flow, valid = identity_flow(10, 10)
    empty = keypoints([], torch.zeros(0, 8))
    some = keypoints([(1, 1), (2, 2)], one_hot([0, 1]))
    for a, b in ((empty, empty), (empty, some), (some, empty)):
        m = pair_metrics(a, b, flow, valid, k=16)
        assert (m.nc, m.ncm, m.cmr, m.repeatability) == (0, 0, 0.0, 0.0)
        assert m.ncm_curve == (0,) * 10 and m.cmr_curve == (0.0,) * 10


def test_all_matches_wrong():
    flow, valid = identity_flow(100, 100)
    xy = [(10.0 * i + 5, 7.0 * i + 3) for i in range(8)]
    kp_a = keypoints(xy, one_hot(list(range(8))))
    kp_b = keypoints([(x + 15, y) for x, y in xy], one_hot(list(range(8))))  # 15 px off
    m = pair_metrics(kp_a, kp_b, flow, valid, k=8)
    assert (m.nc, m.ncm, m.cmr) == (8, 0, 0.0)
    assert m.ncm_curve == (0,) * 10
    assert m.repeatability == 0.0


def test_all_points_project_outside_b():
    h = torch.tensor([[1.0, 0, 100], [0, 1, 0], [0, 0, 1]])  # shift right past B's width
    flow, valid = flow_from_homography(h, (40, 40), (40, 40))
    kp = keypoints([(5, 5), (10, 20), (30, 30)], one_hot([0, 1, 2]))
    m = pair_metrics(kp, kp, flow, valid, k=10)
    assert (m.nc, m.ncm, m.cmr, m.repeatability) == (3, 0, 0.0, 0.0)


def test_aligned_pair_exact_and_subpixel():
    flow, valid = identity_flow(50, 60)
    kp_a = keypoints([(10.25, 20.5), (30.0, 40.0), (59.0, 49.0)], one_hot([0, 1, 2]))
    kp_b = keypoints([(10.25, 23.5), (30.0, 40.0), (58.0, 49.0)], one_hot([0, 1, 2]))
    m = pair_metrics(kp_a, kp_b, flow, valid, k=4)
    assert (m.nc, m.ncm) == (3, 3)  # errors 3 (inclusive), 0, 1
    assert m.ncm_curve[:3] == (2, 2, 3)


def reference_pair_metrics(kp_a, kp_b, h, k, t):
    """Slow reference with the homography applied directly (affine, so flow sampling is exact)."""
    a_xy, b_xy = kp_a.xy[:k].double().numpy(), kp_b.xy[:k].double().numpy()
    matches = brute_force_mnn(kp_a.descriptors[:k].numpy(), kp_b.descriptors[:k].numpy())
    proj = a_xy @ h[:2, :2].T + h[:2, 2]
    ncm = sum(np.linalg.norm(proj[i] - b_xy[j]) <= t for i, j in matches)
    return len(matches), ncm


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 60))
def test_pair_metrics_against_reference(seed, k):
    rng = np.random.default_rng(seed)
    h = np.array([[1.0, 0.0, rng.uniform(-3, 3)], [0.0, 1.0, rng.uniform(-3, 3)], [0, 0, 1]])
    flow, valid = flow_from_homography(torch.from_numpy(h).float(), (64, 64), (64, 64))
    n = 50
    xy = rng.uniform(5, 58, size=(n, 2)).astype(np.float32)
    desc = integer_descriptors(rng, n, 6, 2)
    xy_b = xy + h[:2, 2].astype(np.float32) + rng.normal(0, 2.5, size=(n, 2)).astype(np.float32)
    desc_b = desc + rng.integers(-1, 2, size=desc.shape).astype(np.float32)
    kp_a = Features(torch.from_numpy(xy), torch.linspace(1, 0, n), torch.from_numpy(desc))
    kp_b = Features(torch.from_numpy(xy_b), torch.linspace(1, 0, n), torch.from_numpy(desc_b))
    m = pair_metrics(kp_a, kp_b, flow, valid, k=k)
    nc, ncm = reference_pair_metrics(kp_a, kp_b, h, k, 3.0)
    assert (m.nc, m.ncm) == (nc, ncm)
    assert list(m.ncm_curve) == sorted(m.ncm_curve)  # NCM grows with the threshold
    assert all(0 <= c <= 100 for c in m.cmr_curve)


def test_repeatability_counts_only_points_inside_b():
    h = torch.tensor([[1.0, 0, 20], [0, 1, 0], [0, 0, 1]])
    flow, valid = flow_from_homography(h, (30, 30), (30, 30))
    a = torch.tensor([[1.0, 1.0], [2.0, 5.0], [25.0, 5.0]])  # the last maps to x = 45: outside
    b = torch.tensor([[21.0, 3.0]])  # 2 px from G(a0), 2.24 px from G(a1)
    assert float(repeatability(a, b, flow, valid, 2.0)) == pytest.approx(50.0)
    assert float(repeatability(a, b, flow, valid, 3.0)) == pytest.approx(100.0)


@pytest.mark.parametrize(
    "n, m, radius, block", [(500, 700, 3.0, 1 << 20), (300, 50, 10.0, 7), (40, 0, 3.0, 64)]
)
def test_has_neighbour_equals_all_pairs_distances(n, m, radius, block):
    rng = np.random.default_rng(n + m)
    pts = torch.from_numpy(rng.uniform(0, 200, size=(n, 2)).astype(np.float32))
    tgt = torch.from_numpy(rng.uniform(0, 200, size=(m, 2)).astype(np.float32))
    # targets exactly at distance radius along x and along y, and just beyond (inclusive test)
    tgt = torch.cat(
        [tgt, pts[:5] + torch.tensor([radius, 0.0]), pts[5:10] + torch.tensor([0.0, radius + 0.01])]
    )
    ref = (torch.cdist(pts.double(), tgt.double()) <= radius).any(dim=1)
    got = has_neighbour(pts, tgt, radius, block=block)
    assert torch.equal(got, ref)
    assert got[:5].all()


def test_k_must_be_positive(homography_case):
    kp_a, kp_b, flow, valid = homography_case
    with pytest.raises(ValueError, match="k must be > 0"):
        pair_metrics(kp_a, kp_b, flow, valid, k=0)


# ----------------------------------------------------------------------------- means, names


def test_mean_metrics_and_names(homography_case):
    kp_a, kp_b, flow, valid = homography_case
    first = pair_metrics(kp_a, kp_b, flow, valid, k=1024)
    empty = pair_metrics(kp_a.top(0), kp_b.top(0), flow, valid, k=1024)
    mean = mean_metrics([first, empty])
    assert isinstance(mean, MeanMetrics)
    assert (mean.num_pairs, mean.nc, mean.ncm, mean.cmr) == (2, 2.0, 1.0, 25.0)
    assert mean.ncm_curve[0] == 0.5 and mean.cmr_curve[3] == 37.5
    named = mean.as_dict()
    assert named["nc_k1024"] == 2.0
    assert named["ncm@3px_k1024"] == 1.0
    assert named["cmr@3px_k1024"] == 25.0
    assert named["rep@3px_k1024"] == 37.5
    assert named["cmr@10px_k1024"] == 37.5
    assert metric_name("ncm", 2048, 2.5) == "ncm@2.5px_k2048"
    with pytest.raises(ValueError, match="differ"):
        mean_metrics([first, pair_metrics(kp_a, kp_b, flow, valid, k=2)])
    with pytest.raises(ValueError, match="at least one"):
        mean_metrics([])
