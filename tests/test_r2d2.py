"""R2D2: official checkpoint loading, network outputs, loss terms and extraction.

Real data: RoadScene pairs from ``../shared/data`` and the official checkpoints from
``../shared/weights`` (tests needing one are skipped, with the path tried, when it is absent).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import s2study
from s2study.checkpoint import safe_torch_load
from s2study.errors import CheckpointError, ConfigError
from s2study.geometry import flow_from_homography, identity_flow
from s2study.methods import METHODS
from s2study.methods.r2d2 import (
    R2D2,
    cosim_loss,
    is_official_checkpoint,
    negative_histogram,
    neighbourhood_offsets,
    official_checkpoint_params,
    peaky_loss,
    pyramid_sizes,
    quantized_ap,
    sample_positions,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_ID, VAL_ID = "FLIR_00006", "FLIR_00548"

#: the official checkpoints and the architecture each one's ``net`` string describes
OFFICIAL_FILES = {
    "r2d2_WASF_N16.pt": {"dim": 128, "mchan": 4, "relu22": False, "downsample_factor": 1},
    "r2d2_WAF_N16.pt": {"dim": 128, "mchan": 4, "relu22": False, "downsample_factor": 1},
    "r2d2_WASF_N8_big.pt": {"dim": 128, "mchan": 6, "relu22": False, "downsample_factor": 1},
    "faster2d2_WASF_N16.pt": {"dim": 128, "mchan": 4, "relu22": False, "downsample_factor": 2},
}


def official_file(name: str) -> Path:
    """An official checkpoint in ``$S2STUDY_WEIGHTS`` or ``../shared/weights``, else skip."""
    root = Path(os.environ.get("S2STUDY_WEIGHTS") or REPO.parent / "shared" / "weights")
    path = root / name
    if not path.is_file():
        pytest.skip(f"official R2D2 checkpoint absent: {path} (set S2STUDY_WEIGHTS)")
    return path


@pytest.fixture(scope="module")
def official_path() -> Path:
    return official_file("r2d2_WASF_N16.pt")


@pytest.fixture(scope="module")
def fast_path() -> Path:
    return official_file("faster2d2_WASF_N16.pt")


@pytest.fixture(scope="module")
def fast_net(fast_path) -> R2D2:
    return R2D2.from_official_checkpoint(fast_path).eval()


@pytest.fixture(scope="module")
def official_net(official_path) -> R2D2:
    return R2D2.from_official_checkpoint(official_path).eval()


def read_rgb(roadscene: Path, folder: str, pair_id: str) -> np.ndarray:
    image = cv2.imread(str(roadscene / folder / f"{pair_id}.jpg"), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {roadscene / folder / pair_id}.jpg"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def rotation_homography(size: int, degrees: float, scale: float, shift=(0.0, 0.0)) -> np.ndarray:
    """Rotation + scale about the crop centre, then a shift (maps A's pixels onto B's)."""
    c = (size - 1) / 2
    a = math.radians(degrees)
    rot = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    h = np.eye(3)
    h[:2, :2] = rot
    h[:2, 2] = np.array([c, c]) - rot @ np.array([c, c]) + np.asarray(shift)
    return h


def homography_pair(
    roadscene: Path,
    pair_id: str,
    x0: int,
    y0: int,
    size: int,
    h: np.ndarray,
    folders: tuple[str, str] = ("crop_LR_visible", "cropinfrared"),
):
    """A = crop of ``folders[0]``, B = the same crop of ``folders[1]`` warped by ``h``.

    Returns images (1, 3, size, size) and the flow A -> B (1, size, size, 2) and valid mask.
    """
    crop_a, crop_b = (
        read_rgb(roadscene, f, pair_id)[y0 : y0 + size, x0 : x0 + size] for f in folders
    )
    warped = cv2.warpPerspective(crop_b, h, (size, size), flags=cv2.INTER_LINEAR)
    flow, valid = flow_from_homography(torch.from_numpy(h).float(), (size, size), (size, size))
    return to_tensor(crop_a), to_tensor(warped), flow[None], valid[None]


def mutual_nn_correct(kp_a, kp_b, threshold: float = 3.0) -> int:
    """Mutual nearest neighbours of the descriptors within ``threshold`` px (identity GT)."""
    if len(kp_a) == 0 or len(kp_b) == 0:
        return 0
    sim = kp_a.descriptors @ kp_b.descriptors.t()
    ab, ba = sim.argmax(1), sim.argmax(0)
    mutual = ba[ab] == torch.arange(len(kp_a))
    err = (kp_a.xy[mutual] - kp_b.xy[ab[mutual]]).norm(dim=1)
    return int((err <= threshold).sum())


# ------------------------------------------------------------------ registration and params


def test_registered_with_the_paper_crop():
    assert METHODS.get("r2d2") is R2D2
    assert R2D2.name == "r2d2" and R2D2.default_crop == 192


@pytest.mark.parametrize(
    "bad",
    [
        {"pos_d": 5},
        {"ap_nq": 1},
        {"patch_size": 15},
        {"subq": 0},
        {"ap_base": 1.0},
        {"ngh2": 7},
        {"downsample_factor": 0},
        {"downsample_factor": 3},
        {"downsample_factor": 2.0},
        {"downsample_factor": True},
    ],
)
def test_invalid_params_are_config_errors(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"r2d2.{key}|r2d2.neg_d|unknown parameter.*{key}"):
        R2D2(**bad)


# ------------------------------------------------------------------ checkpoints


def test_official_checkpoint_loads_strictly(official_path):
    raw = torch.load(official_path, map_location="cpu", weights_only=True)
    assert is_official_checkpoint(raw)
    net = R2D2()
    net.load_pretrained(official_path)
    state = net.state_dict()
    assert set(state) == {k.removeprefix("module.") for k in raw["state_dict"]}
    for key, value in raw["state_dict"].items():
        assert torch.equal(state[key.removeprefix("module.")], value), key


@pytest.mark.parametrize("name, arch", OFFICIAL_FILES.items())
def test_every_official_file_loads_strictly_and_extracts(roadscene, name, arch):
    """Every official checkpoint: every key and shape, through both entry points, and
    K keypoints inside a real thermal image (329 x 500: an odd height for the Fast net)."""
    path = official_file(name)
    raw = safe_torch_load(path)  # faster2d2: defaultdicts, which torch's own weights_only refuses
    assert is_official_checkpoint(raw)
    net = R2D2.from_official_checkpoint(path).eval()
    assert {k: net.params[k] for k in arch} == arch
    state = net.state_dict()
    assert set(state) == {k.removeprefix("module.") for k in raw["state_dict"]}
    for key, value in raw["state_dict"].items():
        assert torch.equal(state[key.removeprefix("module.")], value), key

    image = read_rgb(roadscene, "cropinfrared", TRAIN_ID)
    height, width = image.shape[:2]
    k = 1024
    feats = s2study.load_extractor(path)(image, max_keypoints=k)
    assert feats.keypoints.shape == (k, 2) and feats.descriptors.shape == (k, arch["dim"])
    x, y = feats.keypoints[:, 0], feats.keypoints[:, 1]
    assert (x >= 0).all() and (x <= width - 1).all() and (y >= 0).all() and (y <= height - 1).all()
    assert np.allclose(np.linalg.norm(feats.descriptors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(feats.scores).all() and (np.diff(feats.scores) <= 0).all()
    # the same network as from_official_checkpoint builds
    kp = net.extract(to_tensor(image), k)
    assert np.array_equal(feats.keypoints, kp.xy.numpy())
    assert np.allclose(feats.descriptors, kp.descriptors.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "net_string",
    [
        "Faster_Quad_L2Net_ConfCFS()",
        "Fast_Quad_L2Net_ConfCFS(evil=1)",
        "Fast_Quad_L2Net_ConfCFS(bn_affine=True)",
        "Fast_Quad_L2Net_ConfCFS(dilated=False)",
        "Fast_Quad_L2Net_ConfCFS(downsample_factor=1)",
        "Fast_Quad_L2Net_ConfCFS(downsample_factor=3)",
        "Fast_Quad_L2Net_ConfCFS(downsample_factor=2.0)",
        "Fast_Quad_L2Net_ConfCFS(downsample_factor=__import__('os'))",
        "Quad_L2Net_ConfCFS(downsample_factor=2)",
        "Quad_L2Net_ConfCFS(downsample_factor=1)",
        "__import__('os').system('echo pwned')",
        "Quad_L2Net_ConfCFS(dim=__import__('os'))",
        "Quad_L2Net_ConfCFS(bn_affine=True)",
        "Quad_L2Net_ConfCFS(128)",
        "Quad_L2Net_ConfCFS(dim=1.5)",
        "Quad_L2Net_ConfCFS()\nimport os",
    ],
)
def test_non_whitelisted_architecture_strings_are_refused(net_string):
    with pytest.raises(CheckpointError, match="demo.pt"):
        official_checkpoint_params(net_string, source="demo.pt")


def test_whitelisted_architecture_strings_parse():
    assert official_checkpoint_params("Quad_L2Net_ConfCFS()") == {
        "dim": 128,
        "mchan": 4,
        "relu22": False,
        "downsample_factor": 1,
    }
    parsed = official_checkpoint_params(" Quad_L2Net_ConfCFS( dim = 64, relu22=True ) ")
    assert parsed == {"dim": 64, "mchan": 4, "relu22": True, "downsample_factor": 1}
    assert R2D2(**parsed).clf.in_channels == 64
    assert official_checkpoint_params("Fast_Quad_L2Net_ConfCFS()") == {
        "dim": 128,
        "mchan": 4,
        "relu22": False,
        "downsample_factor": 2,
    }
    parsed = official_checkpoint_params(
        "Fast_Quad_L2Net_ConfCFS(dim=64, mchan=2, relu22=True, downsample_factor=4)"
    )
    assert parsed == {"dim": 64, "mchan": 2, "relu22": True, "downsample_factor": 4}
    net = R2D2(**parsed).eval()
    assert isinstance(net.ops[9], torch.nn.MaxPool2d) and net.ops[9].kernel_size == 4
    assert net(torch.rand(1, 3, 30, 26)).descriptors.shape == (1, 64, 30, 26)


def _official_file(path: Path, net: str, state: dict) -> Path:
    torch.save({"net": net, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def test_bad_official_files_raise_checkpoint_errors_naming_the_file(tmp_path):
    torch.manual_seed(0)
    state = R2D2().state_dict()
    good = _official_file(tmp_path / "good.pt", "Quad_L2Net_ConfCFS()", state)
    net = R2D2()
    net.load_pretrained(good)  # positive control: the same layout loads
    assert torch.equal(net.ops[0].weight, state["ops.0.weight"])

    renamed = dict(state)
    renamed["ops.99.weight"] = renamed.pop("ops.3.weight")
    bad = _official_file(tmp_path / "renamed.pt", "Quad_L2Net_ConfCFS()", renamed)
    with pytest.raises(
        CheckpointError,
        match=r"renamed\.pt.*missing keys: ops\.3\.weight.*unexpected keys: ops\.99\.weight",
    ):
        R2D2().load_pretrained(bad)

    reshaped = {**state, "clf.weight": torch.zeros(3, 128, 1, 1)}
    bad = _official_file(tmp_path / "reshaped.pt", "Quad_L2Net_ConfCFS()", reshaped)
    with pytest.raises(CheckpointError, match=r"reshaped\.pt.*wrong shapes: clf\.weight"):
        R2D2().load_pretrained(bad)

    bad = _official_file(tmp_path / "arch.pt", "Fast_Quad_L2Net_ConfCFS()", state)
    with pytest.raises(CheckpointError, match=r"arch\.pt.*downsample_factor.*differs"):
        R2D2().load_pretrained(bad)
    with pytest.raises(  # Quad weights under the Fast name: the pool shifts every index
        CheckpointError,
        match=r"arch\.pt.*missing keys: ops\.10\.weight.*unexpected keys: ops\.9\.weight",
    ):
        R2D2.from_official_checkpoint(bad)
    fast = _official_file(
        tmp_path / "fast.pt", "Fast_Quad_L2Net_ConfCFS()", R2D2(downsample_factor=2).state_dict()
    )
    with pytest.raises(CheckpointError, match=r"fast\.pt.*differs"):
        R2D2().load_pretrained(fast)
    R2D2(downsample_factor=2).load_pretrained(fast)
    bad = _official_file(tmp_path / "evil.pt", "Fast_Quad_L2Net_ConfCFS(evil=1)", state)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*not supported"):
        R2D2.from_official_checkpoint(bad)

    bad = _official_file(
        tmp_path / "dim.pt", "Quad_L2Net_ConfCFS(dim=64)", R2D2(dim=64).state_dict()
    )
    with pytest.raises(CheckpointError, match=r"dim\.pt.*differs"):
        R2D2().load_pretrained(bad)
    assert R2D2.from_official_checkpoint(bad).params["dim"] == 64

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        R2D2().load_pretrained(junk)
    with pytest.raises(CheckpointError, match=r"absent\.pt.*no such"):
        R2D2().load_pretrained(tmp_path / "absent.pt")


def test_is_official_checkpoint():
    assert is_official_checkpoint({"net": "Quad_L2Net_ConfCFS()", "state_dict": {}})
    assert not is_official_checkpoint(
        {"format": "s2study-checkpoint", "net": "x", "state_dict": {}}
    )
    assert not is_official_checkpoint({"state_dict": {}})
    assert not is_official_checkpoint([1, 2])


# ------------------------------------------------------------------ network


def test_forward_shapes_and_normalisation():
    torch.manual_seed(0)
    net = R2D2()
    out = net(torch.rand(2, 3, 40, 56))
    assert out.descriptors.shape == (2, 128, 40, 56) and out.stride == 1
    assert torch.allclose(out.descriptors.norm(dim=1), torch.ones(2, 40, 56), atol=1e-5)
    rep, rel = out.extras["repeatability"], out.extras["reliability"]
    assert rep.shape == rel.shape == out.scores.shape == (2, 1, 40, 56)
    assert ((rep > 0) & (rep < 1) & (rel > 0) & (rel < 1)).all()
    assert torch.allclose(out.scores, rep * rel)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(2, 1, 40, 56))


def test_eval_mode_folds_batch_norm_without_changing_outputs(official_net):
    x = torch.rand(1, 3, 48, 40)
    folded = official_net(x)
    # the reference: run the ops list as the official net does (conv, BN, ReLU modules)
    feats = (x - official_net._mean) / official_net._std
    for op in official_net.ops:
        feats = op(feats)
    assert torch.allclose(
        folded.descriptors, torch.nn.functional.normalize(feats, dim=1), atol=1e-4
    )


#: the official Fast_Quad_L2Net op order: ("conv", ops index, dilation, BN, ReLU), "pool",
#: "up" (dilations of the official dilated mode: the pool replaces the third stride)
FAST_OPS = [
    ("conv", 0, 1, True, True),
    ("conv", 3, 1, True, True),
    ("conv", 6, 1, True, True),
    "pool",
    ("conv", 10, 1, True, True),
    ("conv", 13, 1, True, True),
    ("conv", 16, 2, True, True),
    ("conv", 19, 2, True, False),
    ("conv", 21, 4, True, False),
    ("conv", 23, 8, False, False),
    "up",
]


def reference_fast_forward(state: dict, images: torch.Tensor, full_size: bool = False):
    """``Fast_Quad_L2Net_ConfCFS`` in eval mode, op by op on the raw state dict.

    ``full_size``: upsample to the input size (s2study's departure for odd sizes) instead
    of the official ``Upsample(scale_factor=2)``.
    """
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (images - mean) / std
    for op in FAST_OPS:
        if op == "pool":
            x = torch.nn.MaxPool2d(kernel_size=2)(x)
        elif op == "up":
            x = F.interpolate(
                x,
                **({"size": images.shape[-2:]} if full_size else {"scale_factor": 2}),
                mode="bilinear",
                align_corners=False,
            )
        else:
            _, at, dilation, bn, relu = op
            weight, bias = state[f"ops.{at}.weight"], state[f"ops.{at}.bias"]
            pad = (weight.shape[-1] - 1) * dilation // 2
            x = F.conv2d(x, weight, bias, padding=pad, dilation=dilation)
            if bn:
                mean_, var = state[f"ops.{at + 1}.running_mean"], state[f"ops.{at + 1}.running_var"]
                x = F.batch_norm(x, mean_, var, training=False, eps=1e-5)
            if relu:
                x = F.relu(x)
    reliability = F.softmax(F.conv2d(x**2, state["clf.weight"], state["clf.bias"]), dim=1)
    u = F.softplus(F.conv2d(x**2, state["sal.weight"], state["sal.bias"]))
    return F.normalize(x, dim=1), u / (1 + u), reliability[:, 1:2]


@pytest.mark.parametrize("size, full_size", [((64, 96), False), ((65, 97), True)])
def test_fast_network_matches_the_official_op_order(fast_path, fast_net, size, full_size):
    """Known answer: the loaded faster2d2 network against the official forward written out;
    at an odd size the maps are full size (the official ones would be 64 x 96)."""
    state = {
        k.removeprefix("module."): v
        for k, v in safe_torch_load(fast_path)["state_dict"].items()
    }
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, *size, generator=gen)
    with torch.no_grad():
        out = fast_net(x)
        desc, rep, rel = reference_fast_forward(state, x, full_size)
    assert out.descriptors.shape == (1, 128, *size) and out.scores.shape == (1, 1, *size)
    assert torch.allclose(out.descriptors, desc, atol=1e-5)
    assert torch.allclose(out.extras["repeatability"], rep, atol=1e-5)
    assert torch.allclose(out.extras["reliability"], rel, atol=1e-5)
    if not full_size:  # the module list itself is the official one too
        with torch.no_grad():
            feats = _module_trunk(fast_net, (x - fast_net._mean) / fast_net._std)
        assert torch.allclose(out.descriptors, F.normalize(feats, dim=1), atol=1e-5)


def _module_trunk(net, x):
    """The reference training trunk: the ops list as the official net runs it."""
    for op in net.ops:
        x = op(x)
    return x


def _trunk_grads(net, trunk, x, grad, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = trunk(net, x)
    (out.to(grad.dtype) * grad).sum().backward()
    return out, {k: p.grad for k, p in net.named_parameters() if k.startswith("ops.")}


def test_lean_training_trunk_equals_the_module_trunk():
    """The memory-lean trunk (BN saving its output, ReLU fused into the next conv) gives the
    module trunk's output, parameter gradients and batch-norm statistics (float64)."""
    import copy

    torch.manual_seed(0)
    lean = R2D2(mchan=2, dim=32, low_memory=True).double().train()
    ref = copy.deepcopy(lean)
    x, grad = torch.rand(3, 3, 40, 36).double(), torch.randn(3, 32, 40, 36).double()
    out_lean, g_lean = _trunk_grads(lean, lambda n, v: n._trunk(v), x, grad)
    out_ref, g_ref = _trunk_grads(ref, _module_trunk, x, grad)
    assert torch.equal(out_lean, out_ref)
    for name, g in g_ref.items():
        if name.endswith("weight"):
            assert torch.allclose(g_lean[name], g, rtol=1e-9, atol=1e-12), name
        else:  # a bias ahead of batch norm has a zero gradient: both are rounding noise
            assert (g_lean[name] - g).abs().max() < 1e-9, name
    for (name, a), b in zip(lean.named_buffers(), ref.buffers()):
        assert torch.equal(a, b), name


def test_lean_training_trunk_under_bf16_is_as_accurate_as_the_module_trunk():
    import copy

    torch.manual_seed(0)
    base = R2D2(mchan=2, dim=32, low_memory=True).train()
    x, grad = torch.rand(2, 3, 48, 48), torch.randn(2, 32, 48, 48)
    _, truth = _trunk_grads(copy.deepcopy(base).double(), _module_trunk, x.double(), grad.double())
    _, g_lean = _trunk_grads(copy.deepcopy(base), lambda n, v: n._trunk(v), x, grad, autocast=True)
    _, g_ref = _trunk_grads(copy.deepcopy(base), _module_trunk, x, grad, autocast=True)

    def error(g, name):
        return ((g[name].double() - truth[name]).norm() / truth[name].norm()).item()

    for name in (k for k in truth if k.endswith("weight")):
        assert error(g_lean, name) <= 1.1 * error(g_ref, name) + 0.01, name


# ------------------------------------------------------------------ loss pieces (known answers)


def test_neighbourhood_offsets_known_counts():
    pos, neg = neighbourhood_offsets(ngh=7, subd=1, pos_d=3, neg_d=5)
    assert len(pos) == 29 and len(neg) == 80  # lattice points with |o| <= 3; 5 <= |o| <= 7
    assert (pos**2).sum(1).max() <= 9 and ((neg**2).sum(1) >= 25).all()
    assert [0, 0] in pos.tolist()


def _dense_ap(pos: torch.Tensor, neg: torch.Tensor, nq: int) -> torch.Tensor:
    """Reference AP with the full (N, nq, M) triangular quantisation (no scatter)."""
    centres = torch.arange(nq, dtype=torch.float64)

    def bins(x):
        t = ((1 - x) * (nq - 1)).clamp(0, nq - 1)
        return (1 - (t[:, None, :] - centres[None, :, None]).abs()).clamp_min(0).sum(-1)

    rec, counts = bins(pos), bins(pos) + bins(neg)
    prec = rec.cumsum(1) / counts.cumsum(1).clamp_min(1e-16)
    return (prec * rec / rec.sum(1, keepdim=True)).sum(1)


def test_quantized_ap_known_answers_and_dense_reference():
    nq = 20
    centre = 1 - 9 / 19  # a bin centre: no spill into neighbours
    pos = torch.tensor([[1.0], [0.0], [centre]])
    neg = torch.tensor([[0.0, 0.0, -0.5], [1.0, 1.0, 1.0], [1.0, 0.95, -1.0]])
    ap = quantized_ap(pos, negative_histogram(neg, None, nq), nq)
    assert torch.allclose(ap, torch.tensor([1.0, 1 / 4, 1 / 3]), atol=1e-6)
    # a zero weight removes a negative: the last query then has one above instead of two
    weights = torch.tensor([[1.0, 1.0, 1.0]] * 2 + [[1.0, 0.0, 1.0]])
    assert torch.allclose(
        quantized_ap(pos, negative_histogram(neg, weights, nq), nq)[2], torch.tensor(0.5), atol=1e-6
    )

    gen = torch.Generator().manual_seed(0)
    pos = torch.rand(64, 1, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    neg = torch.rand(64, 50, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    ap = quantized_ap(pos, negative_histogram(neg[:, :20]) + negative_histogram(neg[:, 20:]), nq)
    assert torch.allclose(ap.double(), _dense_ap(pos, neg, nq), atol=1e-6)


def test_sample_positions_prefer_valid_pixels_inside_the_border():
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, 20:30, 40:50] = True  # 100 valid pixels: more than the 64 wanted
    mask[1, 16:20, 16:20] = True  # 16 valid pixels: fewer
    xy, ok = sample_positions(mask, border=16, step=-4)  # (64 - 32)**2 / 16 = 64 per image
    assert xy.shape == (2, 64, 2)
    assert ok[0].all() and int(ok[1].sum()) == 16
    x, y = xy[..., 0], xy[..., 1]
    assert ((x >= 16) & (x < 48) & (y >= 16) & (y < 48)).all()
    assert torch.equal(mask[torch.arange(2)[:, None], y, x], ok)
    assert len({tuple(p) for p in xy[0].tolist()}) == 64  # no repeats
    grid, _ = sample_positions(mask, border=16, step=8)
    assert grid.shape == (2, 16, 2) and grid[0, 1].tolist() == [24, 16]


def test_cosim_and_peaky_ignore_pairs_without_correspondences():
    gen = torch.Generator().manual_seed(1)
    rep_a, rep_b = torch.rand(2, 1, 32, 32, generator=gen), torch.rand(2, 1, 32, 32, generator=gen)
    flow, valid = identity_flow(32, 32)
    flows, valids = flow.expand(2, -1, -1, -1), valid.expand(2, -1, -1).clone()
    valids[1] = False
    alone = cosim_loss(rep_a[:1], rep_b[:1], flows[:1], valids[:1])
    assert torch.allclose(cosim_loss(rep_a, rep_b, flows, valids), alone)
    # identical maps on a valid pair: cos = 1
    assert cosim_loss(rep_a[:1], rep_a[:1], flows[:1], valids[:1]).abs() < 1e-5
    assert torch.equal(peaky_loss(torch.zeros(1, 1, 32, 32)), torch.ones(1))  # max = mean = 0
    spikes = torch.zeros(1, 1, 64, 64)
    spikes[..., 8::17, 8::17] = 1.0
    flat = torch.full_like(spikes, float(spikes.mean()))
    assert peaky_loss(spikes) < peaky_loss(flat) - 0.01


# ------------------------------------------------------------------ loss on real pairs


def test_loss_on_real_pair_gives_finite_nonzero_gradients_everywhere(roadscene):
    h = rotation_homography(96, degrees=12.0, scale=1.1)
    img_a, img_b, flow, valid = homography_pair(roadscene, TRAIN_ID, 220, 120, 96, h)
    assert 0.5 < valid.float().mean() < 1.0  # a partially valid pair
    torch.manual_seed(0)
    net = R2D2().train()
    out = net(torch.cat([img_a, img_b]))
    parts = net.loss(out.select(slice(0, 1)), out.select(slice(1, 2)), flow, valid)
    assert {"total", "ap", "cosim", "peaky"} <= set(parts)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_fast_net_training_step_gives_the_same_gradients_with_low_memory(roadscene):
    """A training step of the Fast net on a real pair of odd size (97 px): finite non-zero
    gradients for every parameter, and the same ones from the memory-lean trunk (float64)."""
    h = rotation_homography(97, degrees=10.0, scale=1.05)
    img_a, img_b, flow, valid = homography_pair(roadscene, TRAIN_ID, 220, 120, 97, h)
    images = torch.cat([img_a, img_b]).double()
    torch.manual_seed(0)
    ref = R2D2(downsample_factor=2).double().train()
    lean = R2D2(downsample_factor=2, low_memory=True).double().train()
    lean.load_state_dict(ref.state_dict())
    grads, totals = [], []
    for net in (ref, lean):
        torch.manual_seed(1)  # the same AP samples
        out = net(images)
        assert out.descriptors.shape == (2, 128, 97, 97)
        parts = net.loss(out.select(slice(0, 1)), out.select(slice(1, 2)), flow, valid)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in parts.values())
        parts["total"].backward()
        totals.append(parts["total"].detach())
        grads.append({k: p.grad for k, p in net.named_parameters()})
    assert torch.equal(totals[0], totals[1])
    for name, g in grads[0].items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
        if name.endswith("weight") or name.startswith(("clf", "sal", "ops.23")):
            assert torch.allclose(grads[1][name], g, rtol=1e-7, atol=1e-12), name
        else:  # a bias ahead of batch norm has a zero gradient: both are rounding noise
            assert (grads[1][name] - g).abs().max() < 1e-9, name
    for (name, a), b in zip(lean.named_buffers(), ref.buffers()):
        assert torch.equal(a, b), name


def test_loss_without_correspondences_is_finite_and_zero(roadscene):
    h = rotation_homography(64, degrees=0.0, scale=1.0, shift=(500.0, 0.0))
    img_a, img_b, flow, valid = homography_pair(roadscene, TRAIN_ID, 220, 120, 64, h)
    assert not valid.any()
    torch.manual_seed(0)
    net = R2D2().train()
    out = net(torch.cat([img_a, img_b]))
    parts = net.loss(out.select(slice(0, 1)), out.select(slice(1, 2)), flow, valid)
    assert all(torch.isfinite(v) and v == 0 for v in parts.values())
    parts["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_loss_under_bf16_autocast_stays_finite(roadscene):
    """Mixed precision (as the trainer uses on CUDA; CPU bf16 here): flows stay float32."""
    h = rotation_homography(64, degrees=5.0, scale=1.0, shift=(3.0, -2.0))
    img_a, img_b, flow, valid = homography_pair(roadscene, TRAIN_ID, 220, 120, 64, h)
    torch.manual_seed(0)
    net = R2D2().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.cat([img_a, img_b]))
        parts = net.loss(out.select(slice(0, 1)), out.select(slice(1, 2)), flow, valid)
    assert out.descriptors.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_official_weights_score_the_true_alignment_better(roadscene, official_net):
    """Real crops warped by a known homography: the true flow vs the same flow 12 px off.

    Same-modality pairs (visible -> warped visible, infrared -> warped infrared): the
    off-the-shelf network has no cross-modal skill to speak of (its mean AP on visible ->
    infrared crops is about 0.05 whatever the flow), which is what S2 training is for.
    """
    size, crops = 96, [(180, 100), (300, 160), (60, 200)]
    h = rotation_homography(size, degrees=8.0, scale=1.05)
    pairs = [
        homography_pair(roadscene, TRAIN_ID, x, y, size, h, (folder, folder))
        for folder in ("crop_LR_visible", "cropinfrared")
        for x, y in crops
    ]
    img_a, img_b, flow, valid = (torch.cat(t) for t in zip(*pairs))
    with torch.no_grad():
        out = official_net(torch.cat([img_a, img_b]))
    out_a, out_b = out.select(slice(0, 6)), out.select(slice(6, 12))
    torch.manual_seed(0)
    right = official_net.loss(out_a, out_b, flow, valid)
    torch.manual_seed(0)
    wrong = official_net.loss(out_a, out_b, flow + torch.tensor([12.0, 0.0]), valid)
    assert right["mean_ap"] > 0.8 and wrong["mean_ap"] < 0.3
    assert right["ap"] < wrong["ap"] - 0.3
    assert right["cosim"] < wrong["cosim"] - 0.1
    assert right["total"] < wrong["total"]


# ------------------------------------------------------------------ extraction


def test_pyramid_sizes_follow_the_official_loop():
    steps = pyramid_sizes(329, 500)
    assert [(h, w) for h, w, _ in steps] == [(329, 500), (277, 420), (233, 354), (196, 297)]
    assert all(use for *_, use in steps)
    big = pyramid_sizes(1500, 2000)
    used = [max(h, w) for h, w, use in big if use]
    assert used == [1000, 841, 707, 595, 500, 420, 354, 297]
    assert all(max(h, w) > 1024 for h, w, use in big if not use)
    assert pyramid_sizes(100, 150) == [(100, 150, True)]


def test_extract_single_scale_is_the_official_nms(roadscene, official_net):
    image = to_tensor(read_rgb(roadscene, "crop_LR_visible", TRAIN_ID)[100:260, 150:350])
    k = 200
    kp = official_net.extract(image, k)
    assert 0 < len(kp) <= k and kp.xy.dtype == torch.float32
    assert torch.all(kp.scores[:-1] >= kp.scores[1:])
    assert torch.allclose(kp.descriptors.norm(dim=1), torch.ones(len(kp)), atol=1e-5)
    # every keypoint is a thresholded 3x3 maximum of the repeatability, scored rep * rel
    with torch.no_grad():
        out = official_net(image)
    rep, rel = out.extras["repeatability"][0, 0], out.extras["reliability"][0, 0]
    x, y = kp.xy[:, 0].long(), kp.xy[:, 1].long()
    assert torch.equal(kp.xy, torch.stack([x, y], 1).float())
    assert (x >= 0).all() and (x < 200).all() and (y >= 0).all() and (y < 160).all()
    padded = torch.nn.functional.pad(rep, (1, 1, 1, 1), value=-1.0)
    windows = torch.stack([padded[y + dy, x + dx] for dy in range(3) for dx in range(3)])
    assert torch.equal(windows.max(0).values, rep[y, x])
    assert (rep[y, x] >= 0.7).all() and (rel[y, x] >= 0.7).all()
    assert torch.allclose(kp.scores, (rep * rel)[y, x])
    assert torch.allclose(kp.descriptors, out.descriptors[0, :, y, x].t(), atol=1e-6)


def test_extract_multiscale_merges_scales_in_input_pixels(roadscene, official_path):
    net = R2D2.from_official_checkpoint(official_path, min_size=128).eval()  # 3 scales, cheaply
    image = to_tensor(read_rgb(roadscene, "crop_LR_visible", TRAIN_ID)[60:220, 100:300])
    assert [use for *_, use in pyramid_sizes(160, 200, min_size=128)] == [True] * 3
    single = net.extract(image, 10_000)
    multi = net.extract(image, 300, multiscale=True)
    assert 0 < len(multi) <= 300 and torch.all(multi.scores[:-1] >= multi.scores[1:])
    xy = multi.xy
    assert ((xy >= -0.5) & (xy <= torch.tensor([199.5, 159.5]))).all()
    assert torch.allclose(multi.descriptors.norm(dim=1), torch.ones(len(multi)), atol=1e-5)
    # keypoints from the reduced scales are off the integer grid; scale 1 gives the rest
    off_grid = (xy - xy.round()).abs().sum(1) > 1e-4
    assert off_grid.any() and (~off_grid).any()
    on_grid = {tuple(p) for p in single.xy.tolist()}
    assert all(tuple(p) in on_grid for p in xy[~off_grid].tolist())


@pytest.mark.slow
def test_pretrained_matches_a_val_pair_far_better_than_random(roadscene, official_net):
    """NCM (mutual NN within 3 px, identity ground truth) of the top-1024 keypoints.

    Random weights pass none of the official 0.7 thresholds (NCM 0), so they are also
    compared without thresholds, the harder baseline: random convolutions still match some
    edges of an aligned pair.
    """
    vis = to_tensor(read_rgb(roadscene, "crop_LR_visible", VAL_ID))
    ir = to_tensor(read_rgb(roadscene, "cropinfrared", VAL_ID))
    k = 1024
    pretrained = mutual_nn_correct(official_net.extract(vis, k), official_net.extract(ir, k))
    torch.manual_seed(0)
    thresholded = R2D2(reliability_thr=0.7, repeatability_thr=0.7).eval()
    random_official = mutual_nn_correct(thresholded.extract(vis, k), thresholded.extract(ir, k))
    random_free = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = R2D2().eval()
        kp_vis, kp_ir = net.extract(vis, k), net.extract(ir, k)
        assert len(kp_vis) == len(kp_ir) == k
        random_free.append(mutual_nn_correct(kp_vis, kp_ir))
    print(
        f"NCM@3px K={k} on {VAL_ID}: pretrained {pretrained}, random weights {random_official} "
        f"(official thresholds), {random_free} (no thresholds, seeds 0-2)"
    )
    assert pretrained >= 40 and random_official * 4 <= pretrained
    assert pretrained >= 2 * sum(random_free) / len(random_free)


def test_nan_similarities_give_a_nan_ap_not_an_index_error():
    """A diverged network's NaN scores must turn the loss NaN (the trainer stops on it)."""
    scores = torch.tensor([[0.9, float("nan"), 0.1], [0.5, 0.4, 0.3]])
    hist = negative_histogram(scores)
    assert torch.isnan(hist[0]).any() and torch.isfinite(hist[1]).all()
    ap = quantized_ap(torch.tensor([[0.8], [float("nan")]]), hist)
    assert torch.isnan(ap).any()


def test_a_weights_name_alone_builds_the_architecture_of_its_file():
    from s2study.config.load import load_train_config
    from s2study.train import build_model

    for name, params in (("r2d2_WASF_N8_big", {"mchan": 6, "downsample_factor": 1}),
                         ("faster2d2_WASF_N16", {"mchan": 4, "downsample_factor": 2})):
        net = build_model(load_train_config("r2d2-roadscene", [f"method.weights={name}"]), torch.device("cpu"))
        assert {k: net.params[k] for k in params} == params
    clash = load_train_config("r2d2-roadscene", ["method.weights=r2d2_WASF_N8_big", "method.params.mchan=4"])
    with pytest.raises(CheckpointError, match="differs from this network's"):
        build_model(clash, torch.device("cpu"))  # a value the config sets wins, and must fit
