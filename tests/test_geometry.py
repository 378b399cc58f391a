"""Known-answer tests of the ground-truth representation (dense absolute flow + mask)."""

import math

import numpy as np
import pytest
import torch

from s2study import geometry as G
from s2study.errors import DataError


def test_identity_flow_maps_every_pixel_onto_itself():
    flow, valid = G.identity_flow(3, 4)
    assert flow.shape == (3, 4, 2) and valid.all()
    assert flow[2, 3].tolist() == [3.0, 2.0]


def test_flow_from_translation_and_validity():
    h = torch.tensor([[1.0, 0, 2.0], [0, 1.0, -1.0], [0, 0, 1.0]])
    flow, valid = G.flow_from_homography(h, (4, 5), (4, 5))
    assert flow[0, 0].tolist() == [2.0, -1.0]
    # pixel (x=1, y=2) -> (3, 1): inside; (x=3, y=0) -> (5, -1): outside
    assert valid[2, 1] and not valid[0, 3]
    assert int(valid.sum()) == 3 * 3  # x in 0..2, y in 1..3


def test_rotation_about_a_point_known_answer():
    c, s = math.cos(math.pi / 2), math.sin(math.pi / 2)
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0, 0, 1.0]], dtype=torch.float64)
    pts = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    out = G.warp_points(rot, pts)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0], [-2.0, 0.0]], dtype=torch.float64), atol=1e-12)


def test_batched_homography_flow_matches_single():
    hs = torch.stack([torch.eye(3), torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 1]])])
    flow, valid = G.flow_from_homography(hs, (6, 6), (6, 6))
    assert flow.shape == (2, 6, 6, 2) and valid.shape == (2, 6, 6)
    single, _ = G.flow_from_homography(hs[1], (6, 6), (6, 6))
    assert torch.equal(flow[1], single)
    assert flow[1, 2, 1].tolist() == [2.0, 4.0]


def test_point_at_infinity_is_invalid():
    h = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])  # w = x: x=0 maps to infinity
    flow, valid = G.flow_from_homography(h, (2, 2), (10, 10))
    assert not valid[0, 0] and torch.isfinite(flow).all()


def test_sample_flow_bilinear_and_validity():
    h = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.25], [0, 0, 1.0]])
    flow, valid = G.flow_from_homography(h, (8, 8), (8, 8))
    pts = torch.tensor([[2.5, 3.5], [0.0, 0.0], [7.9, 1.0], [-3.0, 1.0]])
    mapped, ok = G.sample_flow(flow, valid, pts)
    assert torch.allclose(mapped[0], torch.tensor([3.0, 3.75]))
    assert ok.tolist() == [True, True, False, False]  # (7.9,1) -> x 8.4 is outside B; (-3,1) outside A


def test_sample_flow_empty():
    flow, valid = G.identity_flow(4, 4)
    mapped, ok = G.sample_flow(flow, valid, torch.zeros(0, 2))
    assert mapped.shape == (0, 2) and ok.shape == (0,)


def test_compose_flows_chains_translations():
    t1 = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]])
    t2 = torch.tensor([[1.0, 0, 0], [0, 1, 2], [0, 0, 1]])
    f1, v1 = G.flow_from_homography(t1, (6, 6), (6, 6))
    f2, v2 = G.flow_from_homography(t2, (6, 6), (6, 6))
    f, v = G.compose_flows(f1, v1, f2, v2)
    assert f[1, 1].tolist() == [2.0, 3.0] and v[1, 1]
    assert not v[5, 5]  # (5,5) -> (6,5): outside after the first step


def test_check_transform_accepts_affine_and_rejects_bad():
    h = G.check_transform(np.array([[1.0, 0, 3], [0, 1, 4]]), "a.txt")
    assert h.shape == (3, 3) and h[2].tolist() == [0, 0, 1]
    with pytest.raises(DataError, match="bad.npy: .*singular"):
        G.check_transform(np.zeros((3, 3)), "bad.npy")
    with pytest.raises(DataError, match="shape"):
        G.check_transform(np.ones((2, 2)), "x.txt")
    with pytest.raises(DataError, match="non-finite"):
        G.check_transform(np.array([[1, 0, np.nan], [0, 1, 0], [0, 0, 1]]), "n.txt")
