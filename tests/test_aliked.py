"""ALIKED through kornia: official weights, extraction, each loss part on hand-built cases,
gradients, and a short fine-tune on real RoadScene pairs.

Real data: RoadScene through the fixtures of conftest.py, the official ALIKED weights
through the resolver (``../shared/weights`` of a checkout, the cache, or a download).
"""

from __future__ import annotations

import math
import shutil

import cv2
import numpy as np
import pytest
import torch

import s2study
from s2study.config.load import load_train_config, train_config_from_dict
from s2study.errors import CheckpointError, ConfigError
from s2study.geometry import flow_from_homography, identity_flow
from s2study.methods import build_method, load_methods
from s2study.methods.aliked import (
    ALIKED,
    flow_jacobian,
    model_name_of,
    mutual_matches,
    reliability_loss,
    reprojection_loss,
    sparse_nre_loss,
    warp_points,
)
from s2study.metrics import pair_metrics
from s2study.resolver import resolve_weights

PAIR = "FLIR_00006"
#: a mild homography: rotation, shear, scale, translation and some perspective
HOMOGRAPHY = np.array([[0.95, 0.08, 12.0], [-0.06, 1.02, 8.0], [1.0e-4, -5.0e-5, 1.0]])


@pytest.fixture(scope="module")
def n16_path():
    return resolve_weights("aliked-n16")


@pytest.fixture(scope="module")
def visible(roadscene) -> np.ndarray:
    image = cv2.imread(str(roadscene / "crop_LR_visible" / f"{PAIR}.jpg"), cv2.IMREAD_COLOR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255


# ------------------------------------------------------------------ weights and extraction


def test_registered_with_its_weights_and_presets():
    cls = load_methods().get("aliked")
    assert cls is ALIKED and cls.label == "ALIKED"
    assert cls.weights_names == ("aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32")
    for preset in ("aliked-roadscene", "aliked-rgbnir"):
        cfg = load_train_config(preset)
        assert cfg.method.name == "aliked" and cfg.method.weights == "aliked-n16"
        assert (cfg.lambda_ssl, cfg.batch_size, cfg.crop_size, cfg.lr, cfg.weight_decay) == (
            0.4, 2, 192, 1e-4, 5e-4)


@pytest.mark.parametrize("name", ["aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32"])
def test_every_official_file_loads_strictly_but_the_computed_buffer(name):
    path = resolve_weights(name)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert ALIKED.pretrained_params(path) == {"model_name": name}
    net = ALIKED.from_pretrained(path)
    assert net.params["model_name"] == name
    state = net.net.state_dict()
    assert set(state) - set(raw) == {"dkd.hw_grid"} and set(raw) <= set(state)
    for key, value in raw.items():
        assert torch.equal(state[key], value), key


def test_bad_weight_files_name_the_file_and_the_mismatch(tmp_path, n16_path):
    state = torch.load(n16_path, map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError, match=r"aliked-t16.pth: weights do not fit the ALIKED aliked-n16 "
                                              r"network \(wrong shapes: block1.conv1.weight"):
        build_method("aliked", model_name="aliked-n16", pretrained=False).load_pretrained(
            resolve_weights("aliked-t16"))
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "score_head.0.weight"}, missing)
    with pytest.raises(CheckpointError, match=r"missing.pth: .*missing keys: score_head.0.weight"):
        build_method("aliked", pretrained=False).load_pretrained(missing)
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="other.pth: not an ALIKED state dict"):
        build_method("aliked", pretrained=False).load_pretrained(other)


def test_a_renamed_or_modified_file_is_read_by_content_or_shapes(tmp_path):
    n32 = resolve_weights("aliked-n32")
    renamed = tmp_path / "mine.pth"
    shutil.copy(n32, renamed)
    assert model_name_of(renamed) == "aliked-n32"  # by content
    state = torch.load(n32, map_location="cpu", weights_only=True)
    state["score_head.0.weight"] = state["score_head.0.weight"] * 1.01
    torch.save(state, renamed)
    assert model_name_of(renamed) == "aliked-n32"  # by its shapes: 32 sampling positions
    extractor = s2study.load_extractor(renamed)  # routed by ALIKED.recognizes
    assert isinstance(extractor.method, ALIKED) and extractor.name == "mine"


def test_pretrained_extraction_matches_a_warped_copy_of_a_real_image(visible):
    """Same modality, known homography: the official ALIKED-n16 through s2study's metrics."""
    height, width = visible.shape[:2]
    warped = cv2.warpPerspective(visible, HOMOGRAPHY, (width, height), flags=cv2.INTER_LINEAR)
    flow, valid = flow_from_homography(torch.from_numpy(HOMOGRAPHY).float(), (height, width), (height, width))
    extractor = s2study.load_extractor("aliked-n16")
    assert extractor.name == "aliked-n16" and isinstance(extractor.method, ALIKED)
    fa, fb = extractor(visible, 1024), extractor(warped, 1024)
    assert len(fa) == len(fb) == 1024
    assert np.allclose(np.linalg.norm(fa.descriptors, axis=1), 1, atol=1e-5)
    assert (np.diff(fa.scores) <= 0).all()
    x, y = fa.keypoints.T
    assert (x >= 0).all() and (x <= width - 1).all() and (y >= 0).all() and (y <= height - 1).all()
    m = pair_metrics(fa.as_tensors(), fb.as_tensors(), flow, valid, k=1024)
    assert m.nc > 500 and m.cmr > 90, m  # measured: NC 840, NCM 822, CMR 97.9 %


def test_eval_command_takes_the_weights_name(roadscene, tmp_path, capsys):
    from s2study.cli import main

    code = main(["eval", "--checkpoint", "aliked-n16", "--data", f"roadscene:{roadscene}", "--split", "val",
                 "--k", "256", "--max-pairs", "1", "--quiet", "--no-cache", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert "aliked-n16" in capsys.readouterr().out
    assert (tmp_path / "out" / "eval.json").is_file()


def test_extraction_options_and_thresholds(visible):
    torch.manual_seed(0)  # random weights: whatever ran before must not decide what they detect
    net = build_method("aliked", pretrained=False, model_name="aliked-t16")
    image = to_tensor(visible[:96, :128])
    top = net.extract(image, 50)
    assert len(top) == 50 and top.descriptors.shape == (50, 64)
    assert len(net.extract(image, 0)) == 0
    with pytest.raises(ConfigError, match="it accepts: \\(none\\)"):
        net.extract(image, 5, multiscale=True)
    # threshold mode (kornia's): only the maxima above it, fewer than all of them
    high = build_method("aliked", pretrained=False, model_name="aliked-t16", detection_threshold=0.6)
    high.load_state_dict(net.state_dict())
    assert 0 < len(high.extract(image, 5000)) < len(net.extract(image, 5000))


def test_params_are_validated():
    with pytest.raises(ConfigError, match=r"method.params.model_name: 'aliked-n8' is not allowed; expected "
                                          r"one of aliked-t16, aliked-n16, aliked-n16rot, aliked-n32"):
        train_config_from_dict({"method": {"name": "aliked", "params": {"model_name": "aliked-n8"}}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"method.params.w_dss: unknown parameter of method 'aliked' 'w_dss' "
                                          r"\(did you mean 'w_ds'\?\)"):
        train_config_from_dict({"method": {"name": "aliked", "params": {"w_dss": 1.0}}}, "c.yaml")
    assert ALIKED.default_weights(ALIKED.validate_params({"model_name": "aliked-n32"})) == "aliked-n32"
    assert ALIKED.default_weights(ALIKED.validate_params({"pretrained": False})) is None


# ------------------------------------------------------------------ loss parts, known answers


def affine_flow(a: np.ndarray, t: tuple[float, float], h: int, w: int):
    """Dense flow of ``x -> a x + t`` and an all-valid mask."""
    hom = np.eye(3)
    hom[:2, :2], hom[:2, 2] = a, t
    return flow_from_homography(torch.from_numpy(hom).float(), (h, w), (10 * h, 10 * w))


def test_warp_points_and_jacobian_of_an_affine_flow():
    a = np.array([[2.0, 0.5], [-0.25, 1.5]])
    flow, valid = affine_flow(a, (3.0, -1.0), 20, 30)
    xy = torch.tensor([[4.25, 7.5], [10.0, 3.0], [28.5, 18.0]])
    warped, ok = warp_points(xy, flow, valid)
    expected = xy @ torch.from_numpy(a).float().t() + torch.tensor([3.0, -1.0])
    assert ok.all() and torch.allclose(warped, expected, atol=1e-4)
    jac, ok = flow_jacobian(xy[:2], flow, valid)
    assert ok.all() and torch.allclose(jac, torch.from_numpy(a).float().expand(2, 2, 2), atol=1e-4)
    # at the border the central differences leave the image: not usable
    _, ok = flow_jacobian(torch.tensor([[0.0, 5.0]]), flow, valid)
    assert not ok.any()
    # an invalid flow sample anywhere in the bilinear support invalidates the point
    valid[7, 4] = False
    _, ok = warp_points(torch.tensor([[4.5, 7.5], [10.0, 3.0]]), flow, valid)
    assert ok.tolist() == [False, True]


def test_mutual_matches_need_both_directions_and_the_threshold():
    warped = torch.tensor([[10.0, 10.0], [11.0, 10.0], [50.0, 50.0], [80.0, 80.0]])
    ok = torch.tensor([True, True, True, False])
    xy_b = torch.tensor([[10.5, 10.0], [56.0, 50.0], [80.0, 80.0]])
    ia, ib = mutual_matches(warped, ok, xy_b, threshold=5.0)
    # 0 and 1 both want B0, which wants A0 (a tie, the first); A2 is 6 px off; A3 has no flow
    assert ia.tolist() == [0] and ib.tolist() == [0]
    ia, ib = mutual_matches(warped, ok, xy_b, threshold=7.0)
    assert ia.tolist() == [0, 2] and ib.tolist() == [0, 1]


def test_reprojection_loss_measures_both_images():
    """``x -> 2 x``: 1 px off in B is 0.5 px off in A, so the loss is (1 + 0.5) / 2."""
    jac = torch.tensor([[2.0, 0.0], [0.0, 2.0]]).expand(2, 2, 2)
    warped = torch.tensor([[20.0, 10.0], [40.0, 40.0]], requires_grad=True)
    xy_b = torch.tensor([[21.0, 10.0], [40.0, 37.0]])
    loss = reprojection_loss(warped, xy_b, jac, torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert torch.allclose(loss, torch.tensor([0.75, 2.25]), atol=1e-5)
    loss.sum().backward()
    assert torch.allclose(warped.grad, torch.tensor([[-0.75, 0.0], [0.0, 0.75]]), atol=1e-5)
    # a rotation: the same distance in both images
    c, s = math.cos(0.3), math.sin(0.3)
    rot = torch.tensor([[c, -s], [s, c]])[None]
    d = reprojection_loss(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), rot, torch.tensor([0]), torch.tensor([0]))
    assert torch.allclose(d, torch.tensor([5.0]), atol=1e-5)


def test_dispersity_is_kornias_softmax_spread_of_the_window():
    """A peak of height e over a flat 5x5 window: dispersity = 25 / (exp(e / 0.1) + 24)."""
    net = build_method("aliked", pretrained=False, model_name="aliked-t16")
    for height, expected in ((0.1, 25 / (math.e + 24)), (1.0, 25 / (math.exp(10) + 24))):
        scores = torch.zeros(1, 1, 16, 16)
        scores[0, 0, 8, 7] = height
        found = net.detect(scores, torch.rand(1, 64, 16, 16), top_k=1)[0]
        assert torch.allclose(found["xy"], torch.tensor([[7.0, 8.0]]), atol=1e-5)
        assert torch.allclose(found["dispersity"], torch.tensor([expected]), atol=1e-5)
        assert torch.allclose(found["scores"], torch.tensor([height]))
    # an asymmetric peak moves the keypoint toward the heavier side (sub-pixel)
    scores = torch.zeros(1, 1, 16, 16)
    scores[0, 0, 8, 7], scores[0, 0, 8, 8] = 1.0, 0.9
    found = net.detect(scores, torch.rand(1, 64, 16, 16), top_k=1)[0]
    w = math.exp(-1.0)  # exp((0.9 - 1) / 0.1)
    assert torch.allclose(found["xy"][0, 0], torch.tensor(7 + w / (1 + w + 23 * math.exp(-10))), atol=1e-4)


def test_sparse_nre_is_the_cross_entropy_of_the_matching_probability():
    desc_a = torch.eye(3)[:2]  # e0, e1
    desc_b = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    t = 0.5
    loss = sparse_nre_loss(desc_a, desc_b, torch.tensor([0, 1]), torch.tensor([0, 1]), t)

    def ce(sims, target):
        logits = (torch.tensor(sims) - 1) / t
        return float(-(logits[target] - torch.logsumexp(logits, 0)))

    expected = [ce([1.0, 0.6, 0.0], 0), ce([0.0, 0.8, 0.0], 1),  # A -> B over B's keypoints
                ce([1.0, 0.0], 0), ce([0.6, 0.8], 1)]  # B -> A over A's keypoints
    assert torch.allclose(loss, torch.tensor(expected), atol=1e-5)


def test_reliability_moves_score_to_reliable_keypoints():
    desc = torch.eye(4)
    desc_b = desc.clone()
    desc_b[1] = torch.tensor([0.0, 0.6, 0.8, 0.0])  # B1 is ambiguous with A2
    score_a = torch.tensor([0.5, 0.5, 0.2, 0.9], requires_grad=True)
    score_b = torch.tensor([0.5, 0.5, 0.4, 0.1])
    ia = ib = torch.tensor([0, 1, 2])
    t = 1.0
    loss = reliability_loss(desc, desc_b, score_a, score_b, ia, ib, t)
    sim_a = desc[ia] @ desc_b.t()
    r_a = torch.softmax((sim_a - 1) / t, 1)[torch.arange(3), ib]
    expected_a = ((1 - r_a) * score_a[:3]).sum() / score_a[:3].sum()
    assert torch.allclose(loss[0], expected_a)
    loss[0].backward()
    grad = score_a.grad
    assert grad[3] == 0 and grad[1] > grad[0]  # unmatched: untouched; the ambiguous one loses most


def test_whole_loss_on_an_identical_pair(visible):
    torch.manual_seed(0)
    net = ALIKED.from_pretrained(resolve_weights("aliked-t16")).eval()
    image = to_tensor(visible[40:168, 60:188])
    out = net(torch.cat([image, image]))
    a, b = out.split([1, 1])
    flow, valid = identity_flow(128, 128)
    parts = net.loss(a, b, flow[None], valid[None])
    p = net.params
    detected = len(net.detect(a.scores, a.descriptors, p["train_keypoints"])[0]["xy"])
    assert parts["matches"] == detected > 100  # every keypoint is its own match
    assert parts["reprojection"] < 1e-4
    assert 0 < parts["peaky"] < 1 and parts["nre"] >= 0 and 0 < parts["reliability"] <= 1
    total = (p["w_rp"] * parts["reprojection"] + p["w_pk"] * parts["peaky"]
             + p["w_ds"] * parts["nre"] + p["w_rl"] * parts["reliability"])
    assert torch.allclose(parts["total"], total)
    # no valid pixel: only the peak loss is left
    none = net.loss(a, b, flow[None], torch.zeros_like(valid)[None])
    assert none["matches"] == 0 and none["nre"] == 0 and none["reprojection"] == 0
    assert torch.allclose(none["total"], p["w_pk"] * none["peaky"])


def test_gradients_reach_every_trainable_parameter(visible, n16_path):
    torch.manual_seed(0)
    net = ALIKED.from_pretrained(n16_path).train()
    crop = visible[50:242, 100:292]
    warped = cv2.warpPerspective(crop, HOMOGRAPHY, (192, 192))
    flow, valid = flow_from_homography(torch.from_numpy(HOMOGRAPHY).float(), (192, 192), (192, 192))
    out = net(torch.cat([to_tensor(crop), to_tensor(warped)]))
    a, b = out.split([1, 1])
    parts = net.loss(a, b, flow[None], valid[None])
    assert parts["matches"] > 50 and all(torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    trainable = [(n, q) for n, q in net.named_parameters() if q.requires_grad]
    assert len(trainable) == 52
    lacking = [n for n, q in trainable if q.grad is None or not torch.isfinite(q.grad).all() or not q.grad.any()]
    assert lacking == []


# ------------------------------------------------------------------ fine-tuning


@pytest.mark.slow
def test_short_finetune_on_roadscene_changes_val_ncm(roadscene, tmp_path):
    """A few dozen S2 steps from the official ALIKED-n16 at 128 px crops, on CPU."""
    from s2study.data.datasets import open_dataset
    from s2study.train import build_model, train, validate

    cfg = load_train_config("aliked-roadscene", [
        f"data.root={roadscene}", "data.max_val_pairs=4", "data.val_max_size=256", "epochs=2",
        "steps_per_epoch=15", "batch_size=1", "crop_size=128", "lr=3e-4", "device=cpu", "precision=fp32",
    ])
    val = open_dataset(cfg.data, cfg.data.val_split)
    before = validate(build_model(cfg, torch.device("cpu")), val, cfg.val_k, cfg.val_threshold_px,
                      torch.device("cpu"))["val_ncm"]
    result = train(cfg, out_dir=tmp_path / "run", progress=False)
    after = result.history[-1]["val_ncm"]
    losses = [h["loss/total"] for h in result.history]
    assert all(math.isfinite(v) for v in losses) and result.history[-1]["loss/sl/matches"] > 0
    assert after != before, (before, after)
    reloaded = s2study.load_extractor(result.last_checkpoint)
    assert isinstance(reloaded.method, ALIKED) and reloaded.name == "aliked-last"
