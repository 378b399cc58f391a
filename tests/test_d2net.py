"""D2-Net: graphs and strides, VGG16 weight loading, correspondences, loss, detection, extraction."""

from __future__ import annotations

import cv2
import pytest
import torch

from s2study.errors import CheckpointError, ConfigError
from s2study.geometry import flow_from_homography, identity_flow
from s2study.methods import METHODS, build_method
from s2study.methods.d2net import (
    CONV_NAMES,
    VGG16_CONVS,
    D2Net,
    fmap_correspondences,
    fmap_to_pixels,
    hard_detections,
    margin_ranking_loss,
    pixels_to_fmap,
)


def _rgb(path) -> torch.Tensor:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {path}"
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255.0


@pytest.fixture(scope="module")
def road_pair(roadscene) -> tuple[torch.Tensor, torch.Tensor]:
    """The first RoadScene training pair, (1, 3, 329, 500) visible and infrared."""
    pair_id = (roadscene / "splits" / "train.txt").read_text().split()[0]
    return (
        _rgb(roadscene / "crop_LR_visible" / f"{pair_id}.jpg"),
        _rgb(roadscene / "cropinfrared" / f"{pair_id}.jpg"),
    )


def _net(**params) -> D2Net:
    torch.manual_seed(0)
    return D2Net(**params)


def _batched_identity(batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    flow, valid = identity_flow(height, width)
    return flow.expand(batch, -1, -1, -1).clone(), valid.expand(batch, -1, -1).clone()


# --- graphs ---------------------------------------------------------------------------


def test_registered_and_buildable():
    assert METHODS.get("d2net") is D2Net
    net = build_method("d2net", margin=0.5)
    assert net.params["margin"] == 0.5 and D2Net.default_crop == 256


def test_training_graph_shapes_and_stride():
    out = _net()(torch.rand(2, 3, 64, 96))
    assert out.stride == 8
    assert out.descriptors.shape == (2, 512, 8, 12)
    assert out.scores.shape == (2, 1, 8, 12)
    assert out.extras["features"].shape == (2, 512, 8, 12)
    assert torch.allclose(out.descriptors.norm(dim=1), torch.ones(2, 8, 12), atol=1e-5)
    assert torch.allclose(out.scores.sum((1, 2, 3)), torch.ones(2), atol=1e-4)
    assert (out.scores >= 0).all()


def test_dilated_graph_is_the_training_graph_at_double_resolution():
    # pool3 with stride 1 + conv4 dilated by 2: every other cell is exactly the stride-8 output,
    # which also pins the receptive-field centre of both graphs to the same input pixel
    net = _net()
    images = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        coarse = net(images)
        fine = net(images, dilated=True)
    assert fine.stride == 4 and fine.descriptors.shape == (1, 512, 15, 19)
    assert fine.scores.shape == (1, 1, 15, 19)
    feats = fine.extras["features"]
    torch.testing.assert_close(
        feats[..., ::2, ::2], coarse.extras["features"], atol=1e-4, rtol=1e-4
    )
    cells = torch.tensor([0.0, 1.0, 5.0])
    torch.testing.assert_close(fmap_to_pixels(2 * cells, 4), fmap_to_pixels(cells, 8))
    torch.testing.assert_close(fmap_to_pixels(cells, 8), torch.tensor([3.5, 11.5, 43.5]))
    torch.testing.assert_close(pixels_to_fmap(fmap_to_pixels(cells, 4), 4), cells)


def test_translation_equivariance_of_features():
    # shifting the input by one stride shifts the features by one cell (away from borders)
    # (the right borders coincide, the left ones differ by one cell: skip the padding reach)
    net = _net()
    image = torch.rand(1, 3, 48, 192)
    with torch.no_grad():
        f = net(image).extras["features"]
        g = net(image[..., 8:]).extras["features"]
    assert g.shape[-1] == f.shape[-1] - 1
    torch.testing.assert_close(g[..., 7:], f[..., 8:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "layers, trainable",
    [
        ("conv4_3", {"conv4_3"}),
        ("all", set(CONV_NAMES)),
        ("conv3_3", {"conv3_3", "conv4_1", "conv4_2", "conv4_3"}),
    ],
)
def test_train_layers_freezes_the_rest(layers, trainable):
    net = _net(train_layers=layers)
    for name, conv in zip(CONV_NAMES, net.backbone.convs):
        assert conv.weight.requires_grad == (name in trainable)
        assert conv.bias.requires_grad == (name in trainable)


@pytest.mark.parametrize(
    "params, key",
    [
        ({"train_layers": "conv5_1"}, "train_layers"),
        ({"margin": 0.0}, "margin"),
        ({"safe_radius": -1}, "safe_radius"),
        ({"multiscale_scales": []}, "multiscale_scales"),
        ({"preprocessing": "tf"}, "preprocessing"),
    ],
)
def test_invalid_params_are_config_errors(params, key):
    with pytest.raises(ConfigError, match=key):
        D2Net(**params)


def test_caffe_preprocessing_is_bgr_minus_mean():
    net = _net(preprocessing="caffe")
    image = torch.rand(1, 3, 8, 8)
    expected = image.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    torch.testing.assert_close(
        (image.flip(1) - net._mean) * net._scale, expected, atol=1e-3, rtol=1e-4
    )


# --- weights --------------------------------------------------------------------------


def _torchvision_vgg16_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A full torchvision vgg16 state dict layout (features + classifier), random values."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    layout = [(i, cin, cout) for _, i, cin, cout in VGG16_CONVS]
    layout += [(24, 512, 512), (26, 512, 512), (28, 512, 512)]  # conv5_x, unused
    for index, cin, cout in layout:
        state[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen)
        state[f"features.{index}.bias"] = torch.randn(cout, generator=gen)
    state["classifier.0.weight"] = torch.randn(16, 8, generator=gen)  # shape irrelevant: ignored
    state["classifier.0.bias"] = torch.randn(16, generator=gen)
    return state


def test_load_torchvision_vgg16_state_dict(tmp_path, caplog):
    state = _torchvision_vgg16_state()
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    with caplog.at_level("INFO", logger="s2study.methods.d2net"):
        net = _net()
        assert "randomly initialised" in caplog.text
        net.load_pretrained(str(path))
        assert f"loaded from {path}" in caplog.text
    for k, (_, index, _, _) in enumerate(VGG16_CONVS):
        assert torch.equal(net.backbone.convs[k].weight, state[f"features.{index}.weight"])
        assert torch.equal(net.backbone.convs[k].bias, state[f"features.{index}.bias"])
    assert (
        net.backbone.convs[-1].weight.requires_grad
        and not net.backbone.convs[0].weight.requires_grad
    )


@pytest.mark.parametrize("broken", ["shape", "missing", "not_a_dict", "garbage", "absent"])
def test_bad_weight_files_raise_checkpoint_error(tmp_path, broken):
    path = tmp_path / "vgg16.pth"
    state = _torchvision_vgg16_state()
    if broken == "shape":
        state["features.19.weight"] = torch.zeros(512, 256, 3, 3)
        torch.save(state, path)
    elif broken == "missing":
        del state["features.21.bias"]
        torch.save(state, path)
    elif broken == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    elif broken == "garbage":
        path.write_bytes(b"this is not a torch file")
    net = _net()
    before = net.backbone.convs[-1].weight.clone()
    with pytest.raises(CheckpointError, match="vgg16.pth") as info:
        net.load_pretrained(str(path))
    if broken in ("shape", "missing"):
        assert ("features.19.weight" if broken == "shape" else "features.21.bias") in str(
            info.value
        )
    assert torch.equal(net.backbone.convs[-1].weight, before)


# --- correspondences and loss ---------------------------------------------------------


def test_correspondences_of_a_translation():
    # B = A shifted by (+16, +8) px: cell (r, c) of A lands on cell (r + 1, c + 2) of B
    h = torch.tensor([[1.0, 0, 16], [0, 1, 8], [0, 0, 1]])
    flow, valid = flow_from_homography(h, (64, 64), (64, 64))
    cell_b, ok = fmap_correspondences(flow[None], valid[None], (8, 8), (8, 8), 8, 8)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected_ok = (rows.flatten() < 7) & (cols.flatten() < 6)
    assert torch.equal(ok[0], expected_ok)
    assert torch.equal(cell_b[0, expected_ok, 0], rows.flatten()[expected_ok] + 1)
    assert torch.equal(cell_b[0, expected_ok, 1], cols.flatten()[expected_ok] + 2)


def test_correspondences_respect_the_valid_mask_and_strides():
    flow, valid = _batched_identity(2, 64, 64)
    valid[1, :, :32] = False  # left half of the second pair unknown
    # A at stride 8 onto B at stride 4: cell (r, c) -> pixel 8c + 3.5 -> B cell 2c
    cell_b, ok = fmap_correspondences(flow, valid, (8, 8), (15, 15), 8, 4)
    cols = torch.arange(8).repeat(8)
    assert ok[0].all()
    assert torch.equal(cell_b[0, :, 1], 2 * cols)
    assert torch.equal(ok[1], cols >= 4)


def _one_hot_features(h: int, w: int) -> torch.Tensor:
    """(1, h*w, h, w): every cell has its own orthogonal unit descriptor."""
    return torch.eye(h * w).view(h * w, h, w)[None]


@pytest.mark.parametrize("shift, expected", [(0, 0.0), (1, 1.0), (3, 3.0)])
def test_margin_ranking_loss_known_answers(shift, expected):
    # B's descriptors are A's moved `shift` columns right while the flow says identity:
    # shift 0 -> d+ = 0, d- = 2: loss 0; shift 1 -> the true match is inside the safe radius
    # (1 cell), d+ = 2, d- = 2: loss = margin; shift 3 -> outside it, d- = 0: loss = margin + 2
    desc_a = _one_hot_features(4, 10)
    desc_b = torch.roll(desc_a, shifts=shift, dims=3)
    scores_a = torch.rand(1, 1, 4, 10) + 0.1
    scores_b = torch.rand(1, 1, 4, 10) + 0.1
    flow, valid = _batched_identity(1, 32, 80)
    valid[..., :24] = False  # only cell columns 3..6 are valid: no wrapped-around descriptor
    valid[..., 56:] = False
    cell_b, ok = fmap_correspondences(flow, valid, (4, 10), (4, 10), 8, 8)
    assert ok.view(4, 10).sum(0).tolist() == [0, 0, 0, 4, 4, 4, 4, 0, 0, 0]
    loss, has = margin_ranking_loss(desc_a, scores_a, desc_b, scores_b, cell_b, ok, 1.0, 1)
    assert has.tolist() == [True]
    torch.testing.assert_close(loss, torch.tensor([expected]))


def test_loss_weights_by_scores_and_masks_invalid_cells():
    # two cells: one with loss 3 (misdescribed), one with loss 0; the weighted mean follows the scores
    desc_a = _one_hot_features(6, 6)
    desc_b = desc_a.clone()
    desc_b[0, :, 0, 0] = desc_a[0, :, 0, 5]  # cell (0, 0) of B looks like A's cell (0, 5)
    scores = torch.ones(1, 1, 6, 6)
    flow, valid = _batched_identity(1, 48, 48)
    valid[0, 8:, :] = False  # only row 0 of cells is valid
    valid[0, :, 16:] = False  # ... and only its first two cells
    cell_b, ok = fmap_correspondences(flow, valid, (6, 6), (6, 6), 8, 8)
    assert ok.sum() == 2
    scores_a = scores.clone()
    scores_a[0, 0, 0, 0] = 3.0  # the bad cell weighs 3, the good one 1
    loss, _ = margin_ranking_loss(desc_a, scores_a, desc_b, scores, cell_b, ok, 1.0, 1)
    # bad cell: d+ = 2, and its B descriptor equals A's cell (0, 5), outside the radius: d- = 0
    torch.testing.assert_close(loss, torch.tensor([3.0 * 3 / 4]))


def test_all_invalid_pair_gives_finite_zero_and_others_are_averaged():
    net = _net(train_layers="conv4_3")
    images = torch.rand(4, 3, 64, 64)
    out = net(images)
    a, b = out.select(slice(0, 4, 2)), out.select(slice(1, 4, 2))
    flow, valid = _batched_identity(2, 64, 64)
    none = torch.zeros_like(valid)
    parts = net.loss(a, b, flow, none)
    assert parts["total"].item() == 0.0 and parts["correspondences"].item() == 0.0
    parts["total"].backward()
    grad = net.backbone.convs[-1].weight.grad
    assert grad is not None and torch.isfinite(grad).all()

    # one valid pair + one empty pair = the valid pair's loss alone (mean over non-empty pairs)
    half = valid.clone()
    half[1] = False
    with torch.no_grad():
        both = net.loss(a, b, flow, half)["total"]
        first = net.loss(a.select(slice(0, 1)), b.select(slice(0, 1)), flow[:1], valid[:1])["total"]
    torch.testing.assert_close(both, first)
    assert first > 0


def test_loss_rejects_mismatched_ground_truth():
    net = _net()
    out = net(torch.rand(2, 3, 32, 32))
    flow, valid = _batched_identity(1, 32, 32)
    with pytest.raises(ValueError, match="flow"):
        net.loss(out, out, flow, valid)


@pytest.mark.parametrize("layers", ["conv4_3", "conv3_3"])
def test_real_pair_gradients_reach_exactly_the_trained_layers(road_pair, layers):
    vis, ir = road_pair
    crop = slice(100, 228), slice(150, 278)
    images = torch.cat([vis[..., crop[0], crop[1]], ir[..., crop[0], crop[1]]])
    net = _net(train_layers=layers)
    out = net(images)
    flow, valid = _batched_identity(1, 128, 128)
    parts = net.loss(out.select(slice(0, 1)), out.select(slice(1, 2)), flow, valid)
    assert torch.isfinite(parts["total"]) and parts["total"] > 0
    assert parts["correspondences"].item() == 16 * 16
    parts["total"].backward()
    first = CONV_NAMES.index(layers)
    for k, conv in enumerate(net.backbone.convs):
        for p in (conv.weight, conv.bias):
            if k >= first:
                assert (
                    p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                )
            else:
                assert p.grad is None


@pytest.mark.slow
def test_training_on_a_real_pair_teaches_alignment(road_pair):
    # 20 Adam steps on an aligned visible/infrared crop: the loss of the aligned pair drops
    # well below that of the same crop paired with infrared shifted by 40 px (5 cells, beyond
    # the safe radius) and claimed aligned; before training the two are about the same
    vis, ir = road_pair
    y, x, size, shift = 100, 150, 128, 40
    a = vis[..., y : y + size, x : x + size]
    b = ir[..., y : y + size, x : x + size]
    b_shifted = ir[..., y : y + size, x + shift : x + shift + size]
    flow, valid = _batched_identity(1, size, size)
    net = _net(train_layers="all")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def losses() -> tuple[float, float]:
        with torch.no_grad():
            out = net(torch.cat([a, b, b_shifted]))
            aligned = net.loss(out.select(slice(0, 1)), out.select(slice(1, 2)), flow, valid)
            shifted = net.loss(out.select(slice(0, 1)), out.select(slice(2, 3)), flow, valid)
        return aligned["total"].item(), shifted["total"].item()

    aligned0, shifted0 = losses()
    assert abs(shifted0 - aligned0) < 0.05
    pair = torch.cat([a, b])
    for _ in range(20):
        out = net(pair)
        loss = net.loss(out.select(slice(0, 1)), out.select(slice(1, 2)), flow, valid)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    aligned, shifted = losses()
    assert aligned < aligned0 - 0.1
    assert shifted - aligned > 0.1


# --- detection and extraction ---------------------------------------------------------


def _blob(h: int, w: int, cx: float, cy: float, sx: float, sy: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return torch.exp(-((xs - cx) ** 2) / (2 * sx**2) - ((ys - cy) ** 2) / (2 * sy**2))


def test_hard_detection_refines_a_blob_to_subpixel():
    features = torch.zeros(3, 16, 20)
    features[0] = _blob(16, 20, 5.3, 7.6, 1.5, 1.5)
    features[1] = 0.05  # flat channel: depth-wise max far from the blob, but no peak
    features[2] = -1.0  # negative everywhere: never detected
    cells, refined = hard_detections(features, edge_threshold=5.0)
    assert cells.tolist() == [[8, 5]]
    assert torch.allclose(refined[0], torch.tensor([5.3, 7.6]), atol=0.15)


def test_hard_detection_rejects_edges():
    features = _blob(16, 20, 9.2, 7.6, 8.0, 1.0)[None]  # an elongated ridge: an edge
    cells, _ = hard_detections(features, edge_threshold=5.0)
    assert len(cells) == 0
    cells, _ = hard_detections(features, edge_threshold=100.0)  # tolerant: it passes
    assert cells.tolist() == [[8, 9]]


def _check_keypoints(kp, k: int, height: int, width: int) -> None:
    assert 0 < len(kp) <= k
    assert kp.xy.shape == (len(kp), 2) and kp.descriptors.shape == (len(kp), 512)
    assert kp.xy.dtype == torch.float32 and kp.scores.dtype == torch.float32
    assert (kp.scores[:-1] >= kp.scores[1:]).all()
    assert (kp.xy[:, 0] >= -0.5).all() and (kp.xy[:, 0] <= width - 0.5).all()
    assert (kp.xy[:, 1] >= -0.5).all() and (kp.xy[:, 1] <= height - 0.5).all()
    assert torch.allclose(kp.descriptors.norm(dim=1), torch.ones(len(kp)), atol=1e-4)


def test_extract_real_image(road_pair):
    vis, _ = road_pair
    image = vis[..., 40:200, 60:300]
    net = _net()
    everything = net.extract(image, max_keypoints=100000)
    _check_keypoints(everything, 100000, 160, 240)
    assert len(everything) > 10
    kp = net.extract(image, max_keypoints=10)
    assert len(kp) == 10
    torch.testing.assert_close(everything.xy[:10], kp.xy)
    # the score is the soft detection score at the detected cell (here scaled to mean 1)
    out = net(image, dilated=True)
    cells = pixels_to_fmap(everything.xy, 4).round().long()
    dense = out.scores[0, 0, cells[:, 1], cells[:, 0]] * out.scores[0, 0].numel()
    torch.testing.assert_close(everything.scores, dense, atol=1e-4, rtol=1e-4)


def test_extract_stride8_and_multiscale(road_pair):
    _, ir = road_pair
    image = ir[..., 100:196, 200:328]
    coarse = _net(dilated_extraction=False).extract(image, max_keypoints=40)
    _check_keypoints(coarse, 40, 96, 128)
    net = _net(multiscale_scales=[0.5, 1, 2])
    single = net.extract(image, max_keypoints=10000, multiscale=False)
    pyramid = net.extract(image, max_keypoints=10000, multiscale=True)
    _check_keypoints(pyramid, 10000, 96, 128)
    assert len(pyramid) > len(single)


def test_extract_rejects_batches():
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\)"):
        _net().extract(torch.rand(2, 3, 32, 32), 10)


def test_extract_zero_keypoints_keeps_shapes():
    kp = _net().extract(torch.rand(1, 3, 48, 48), 0)
    assert len(kp) == 0
    assert kp.xy.shape == (0, 2) and kp.scores.shape == (0,) and kp.descriptors.shape == (0, 512)


def test_centred_descriptors_remove_the_common_direction_in_training_and_extraction(road_pair):
    """From random weights all positions share one large mean feature (mean cosine near 1):
    centring each image's features removes it, in the training graph and at extraction."""
    torch.manual_seed(0)
    plain = build_method("d2net", train_layers="all")
    centred = build_method("d2net", train_layers="all", center_descriptors=True)
    centred.load_state_dict(plain.state_dict())
    image = road_pair[0][:, :, :128, :128]

    def mean_cosine(net):
        d = net(image).descriptors[0].detach().flatten(1).t()  # (positions, 512), unit rows
        return float((d @ d.t()).mean())

    assert mean_cosine(plain) > 0.5 and abs(mean_cosine(centred)) < 0.05
    raw = centred.dense_features(image)
    assert torch.allclose(centred(image).scores, plain(image).scores)  # detection reads the raw features
    assert torch.allclose(centred._descriptor_features(raw).mean(dim=(2, 3)), torch.zeros(1, 512), atol=1e-4)
    plain.eval()
    centred.eval()
    a, b = plain.extract(image, 64), centred.extract(image, 64)
    assert torch.equal(torch.as_tensor(a.keypoints), torch.as_tensor(b.keypoints))
    assert not torch.allclose(torch.as_tensor(a.descriptors), torch.as_tensor(b.descriptors))
