"""D2-Net (Dusmanu et al., CVPR 2019): describe-and-detect on VGG16 conv4_3 features.

One backbone, two graphs (switched by ``dilated``, never copied):

- training graph: VGG16 up to conv4_3, pool3 = 2x2 average pooling with stride 2, dense
  features at stride 8;
- extraction graph (the official test-time variant): pool3 with stride 1 and conv4_x dilated
  by 2, the same weights giving features at stride 4.

In both graphs feature ``(i, j)`` is centred on input pixel ``(stride * j + 3.5,
stride * i + 3.5)`` (pixel centres at integers): the pooling windows before conv4 are
aligned to the top-left corner, and the stride-1 pool3 adds half a pool2 cell (2 px) to the
stride-4 graph's ``1.5`` (the official code keeps ``4 i + 1.5`` there, 2 px off).

Descriptors are the L2-normalised raw conv4_3 features (the official training loss uses
them; the official extractor ReLUs them first, which we do not, so extraction matches
training). Detection works on ReLU(features):

- soft detection (training, dense scores): soft local max in 3x3 times the depth-wise
  ratio, max over channels, normalised to sum 1 per image;
- hard detection (extraction): local max in 3x3 of a channel that is also the depth-wise
  max, Hessian edge test, and sub-pixel refinement by one Newton step as in the official
  ``HardDetectionModule`` / ``HandcraftedLocalizationModule``.

The loss is the score-weighted triplet margin ranking loss with the hardest negative outside
a safe radius, with correspondences computed from the dense absolute flow A -> B.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2study.checkpoint import safe_torch_load
from s2study.errors import CheckpointError
from s2study.features import Features
from s2study.methods.base import DenseFeatures, Method, Param

log = logging.getLogger(__name__)

#: (name, index in torchvision's ``vgg16().features``, in channels, out channels)
VGG16_CONVS: tuple[tuple[str, int, int, int], ...] = (
    ("conv1_1", 0, 3, 64),
    ("conv1_2", 2, 64, 64),
    ("conv2_1", 5, 64, 128),
    ("conv2_2", 7, 128, 128),
    ("conv3_1", 10, 128, 256),
    ("conv3_2", 12, 256, 256),
    ("conv3_3", 14, 256, 256),
    ("conv4_1", 17, 256, 512),
    ("conv4_2", 19, 512, 512),
    ("conv4_3", 21, 512, 512),
)
CONV_NAMES = tuple(name for name, *_ in VGG16_CONVS)
#: input pixel on which feature (0, 0) is centred, in both graphs
RF_OFFSET = 3.5
#: ImageNet statistics: torchvision ("torch") and caffe (BGR, 0-255, mean only) conventions
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
#: filler for masked similarities: a distance 2 - 2 * (-4) = 10, never the hardest negative
_FAR = -4.0


class VGG16Conv4(nn.Module):
    """VGG16 convolutions up to conv4_3, run as the training or the dilated extraction graph."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=1) for _, _, cin, cout in VGG16_CONVS
        )
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, dilated: bool = False) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, 512, h, w) raw conv4_3 features.

        ``h = H // 8`` in the training graph, ``h = H // 4 - 1`` in the dilated one.
        """
        for k, (name, *_rest) in enumerate(VGG16_CONVS):
            if name == "conv2_1" or name == "conv3_1":
                x = F.max_pool2d(x, 2, stride=2)
            elif name == "conv4_1":
                x = F.avg_pool2d(x, 2, stride=1 if dilated else 2)
            conv = self.convs[k]
            d = 2 if dilated and name.startswith("conv4") else 1
            x = F.conv2d(x, conv.weight, conv.bias, padding=d, dilation=d)
            if name != "conv4_3":
                x = F.relu(x, inplace=True)
        return x


def soft_detection_scores(features: Tensor, window: int = 3, eps: float = 1e-6) -> Tensor:
    """D2-Net soft detection score (paper eq. 3-5), normalised to sum 1 per image.

    Args:
        features: (B, C, h, w) raw dense features (ReLU is applied here).

    Returns:
        (B, 1, h, w) non-negative scores.
    """
    x = F.relu(features)
    b = x.shape[0]
    peak = x.flatten(1).amax(1).clamp_min(eps).view(b, 1, 1, 1)
    e = torch.exp(x / peak)
    pad = window // 2
    # outside the image counts as exp(0), as in the official implementation
    neighbourhood = window * window * F.avg_pool2d(F.pad(e, [pad] * 4, value=1.0), window, stride=1)
    alpha = e / neighbourhood
    beta = x / (x.amax(1, keepdim=True) + eps)
    score = (alpha * beta).amax(1, keepdim=True)
    return score / (score.flatten(1).sum(1).view(b, 1, 1, 1) + eps)


def fmap_to_pixels(pos: Tensor, stride: int) -> Tensor:
    """Feature-map coordinates -> input pixel coordinates (same axis order)."""
    return pos * stride + RF_OFFSET


def pixels_to_fmap(xy: Tensor, stride: int) -> Tensor:
    """Input pixel coordinates -> (sub-pixel) feature-map coordinates."""
    return (xy - RF_OFFSET) / stride


def fmap_correspondences(
    flow: Tensor,
    valid: Tensor,
    size_a: tuple[int, int],
    size_b: tuple[int, int],
    stride_a: int,
    stride_b: int,
) -> tuple[Tensor, Tensor]:
    """Map every feature-map cell of A to its nearest cell of B through a dense flow.

    The flow is sampled bilinearly at each cell's input-pixel centre; a cell is kept when
    every flow sample it uses is valid and its image lands inside B's feature map.

    Args:
        flow: (B, H, W, 2) absolute flow A -> B in B's pixels.
        valid: (B, H, W) bool.
        size_a: (h_a, w_a) of A's feature map; size_b: (h_b, w_b) of B's.
        stride_a, stride_b: input pixels per feature-map cell.

    Returns:
        ``cell_b`` (B, h_a * w_a, 2) long ``(row, col)`` in B's map (clamped inside it) and
        ``ok`` (B, h_a * w_a) bool.
    """
    bsz, height, width, _ = flow.shape
    (ha, wa), (hb, wb) = size_a, size_b
    rows = fmap_to_pixels(torch.arange(ha, device=flow.device, dtype=flow.dtype), stride_a)
    cols = fmap_to_pixels(torch.arange(wa, device=flow.device, dtype=flow.dtype), stride_a)
    gy, gx = torch.meshgrid(rows, cols, indexing="ij")
    grid = torch.stack([2 * gx / (width - 1) - 1, 2 * gy / (height - 1) - 1], dim=-1)
    grid = grid.expand(bsz, ha, wa, 2)
    mapped = F.grid_sample(flow.permute(0, 3, 1, 2), grid, align_corners=True)  # (B, 2, ha, wa)
    support = F.grid_sample(valid[:, None].to(flow.dtype), grid, align_corners=True)
    cell = pixels_to_fmap(mapped.flatten(2).transpose(1, 2), stride_b).round()  # (B, N, 2) x, y
    ok = (support.flatten(1) > 1 - 1e-4) & torch.isfinite(cell).all(-1)
    ok &= (
        (cell[..., 0] >= 0)
        & (cell[..., 0] <= wb - 1)
        & (cell[..., 1] >= 0)
        & (cell[..., 1] <= hb - 1)
    )
    col = cell[..., 0].nan_to_num(0).clamp(0, wb - 1).long()
    row = cell[..., 1].nan_to_num(0).clamp(0, hb - 1).long()
    return torch.stack([row, col], dim=-1), ok


def _near(cells: Tensor, height: int, width: int, radius: int) -> Tensor:
    """(..., N, 2) ``(row, col)`` -> (..., N, height * width) bool: Chebyshev distance to each
    cell of a ``height`` x ``width`` map is <= radius."""
    rows = torch.arange(height, device=cells.device)
    cols = torch.arange(width, device=cells.device)
    near_row = (cells[..., 0, None] - rows).abs() <= radius
    near_col = (cells[..., 1, None] - cols).abs() <= radius
    return (near_row[..., :, None] & near_col[..., None, :]).flatten(-2)


def _hardest(query: Tensor, bank: Tensor, exclude: Tensor) -> Tensor:
    """Highest similarity of each query to the bank outside ``exclude``, differentiable.

    The search runs without autograd; only the chosen similarities carry gradients (the
    gradient of a max). A query whose whole bank is excluded gets ``_FAR``.

    Args:
        query: (B, N, C); bank: (B, M, C); exclude: (B, N, M) or (N, M) bool.

    Returns:
        (B, N) similarities.
    """
    with torch.no_grad():
        sim = torch.bmm(query, bank.transpose(1, 2)).masked_fill_(exclude, _FAR)
        best, index = sim.max(-1)
    chosen = torch.gather(bank, 1, index[..., None].expand(-1, -1, bank.shape[-1]))
    return torch.where(best > _FAR, (query * chosen).sum(-1), torch.full_like(best, _FAR))


def margin_ranking_loss(
    desc_a: Tensor,
    scores_a: Tensor,
    desc_b: Tensor,
    scores_b: Tensor,
    cell_b: Tensor,
    ok: Tensor,
    margin: float,
    safe_radius: int,
) -> tuple[Tensor, Tensor]:
    """Score-weighted triplet margin ranking loss of D2-Net, per pair.

    Every cell of A is a candidate correspondence (masked by ``ok``). The hardest negatives
    are the most similar descriptors of B outside ``safe_radius`` cells of the match, and of
    A outside ``safe_radius`` cells of the cell itself; distances are ``2 - 2 cos``.

    Args:
        desc_a: (B, C, h_a, w_a) L2-normalised; scores_a: (B, 1, h_a, w_a).
        desc_b: (B, C, h_b, w_b) L2-normalised; scores_b: (B, 1, h_b, w_b).
        cell_b: (B, h_a * w_a, 2) long ``(row, col)`` of each A cell's match in B.
        ok: (B, h_a * w_a) bool, valid correspondences.

    Returns:
        ``loss`` (B,) (0 for a pair without correspondences) and ``has`` (B,) bool.
    """
    c, ha, wa = desc_a.shape[1:]
    hb, wb = desc_b.shape[-2:]
    da = desc_a.flatten(2).transpose(1, 2)  # (B, N, C)
    db_all = desc_b.flatten(2).transpose(1, 2)  # (B, M, C)
    index_b = cell_b[..., 0] * wb + cell_b[..., 1]  # (B, N)
    db = torch.gather(db_all, 1, index_b[..., None].expand(-1, -1, c))  # (B, N, C)

    positive = 2 - 2 * (da * db).sum(-1)
    grid_a = torch.stack(
        torch.meshgrid(
            torch.arange(ha, device=da.device), torch.arange(wa, device=da.device), indexing="ij"
        ),
        -1,
    ).flatten(0, 1)
    hardest = torch.maximum(
        _hardest(da, db_all, _near(cell_b, hb, wb, safe_radius)),
        _hardest(db, da, _near(grid_a, ha, wa, safe_radius)),
    )
    negative = 2 - 2 * hardest

    weight = scores_a.flatten(1) * torch.gather(scores_b.flatten(1), 1, index_b) * ok
    total_weight = weight.sum(1)
    numerator = (weight * F.relu(margin + positive - negative)).sum(1)
    has = total_weight > 0
    loss = torch.where(has, numerator / total_weight.clamp_min(1e-30), torch.zeros_like(numerator))
    return loss, has


def hard_detections(features: Tensor, edge_threshold: float) -> tuple[Tensor, Tensor]:
    """Official hard detection with sub-pixel refinement, on one feature map.

    A cell is detected when, in the channel where it is the depth-wise maximum (and > 0),
    it is a 3x3 local maximum, passes the Hessian edge test and its Newton step is smaller
    than half a cell on both axes.

    Args:
        features: (C, h, w) raw features (ReLU applied here).

    Returns:
        ``cells`` (N, 2) long ``(row, col)`` and ``refined`` (N, 2) float ``(x, y)`` in
        feature-map coordinates.
    """
    x = F.relu(features)
    top, channel = x.max(0)
    local_max = F.max_pool2d(x[None], 3, stride=1, padding=1)[0]
    is_peak = (top > 0) & (torch.gather(local_max, 0, channel[None])[0] == top)
    rows, cols = torch.nonzero(is_peak, as_tuple=True)
    ch = channel[rows, cols]
    padded = F.pad(x, (1, 1, 1, 1))
    offsets = torch.arange(3, device=x.device)
    v = padded[
        ch[:, None, None], rows[:, None, None] + offsets[:, None], cols[:, None, None] + offsets
    ]
    dy = 0.5 * (v[:, 2, 1] - v[:, 0, 1])
    dx = 0.5 * (v[:, 1, 2] - v[:, 1, 0])
    dyy = v[:, 0, 1] - 2 * v[:, 1, 1] + v[:, 2, 1]
    dxx = v[:, 1, 0] - 2 * v[:, 1, 1] + v[:, 1, 2]
    dxy = 0.25 * (v[:, 0, 0] - v[:, 0, 2] - v[:, 2, 0] + v[:, 2, 2])
    det = dyy * dxx - dxy * dxy
    trace = dyy + dxx
    not_edge = (det > 0) & (trace * trace <= det * (edge_threshold + 1) ** 2 / edge_threshold)
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    step_y = -(dxx * dy - dxy * dx) / safe_det
    step_x = -(-dxy * dy + dyy * dx) / safe_det
    keep = not_edge & (step_y.abs() < 0.5) & (step_x.abs() < 0.5)
    cells = torch.stack([rows, cols], dim=-1)[keep]
    refined = torch.stack([cols + step_x, rows + step_y], dim=-1)[keep]
    return cells, refined


def _sample_descriptors(features: Tensor, xy: Tensor) -> Tensor:
    """Bilinear features at sub-pixel ``xy`` (N, 2) of a (C, h, w) map -> (N, C) normalised."""
    h, w = features.shape[-2:]
    grid = torch.stack([2 * xy[:, 0] / max(w - 1, 1) - 1, 2 * xy[:, 1] / max(h - 1, 1) - 1], -1)
    sampled = F.grid_sample(features[None], grid[None, None], align_corners=True)[0, :, 0]
    return F.normalize(sampled.t(), dim=1)


def _check_pretrained_state(state: Any, path: Path) -> dict[str, Tensor]:
    """Pick the conv1_1..conv4_3 tensors out of a torchvision VGG16 state dict."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a VGG16 state dict (a {type(state).__name__}; expected a dict with "
            f"keys 'features.N.weight' / 'features.N.bias' as torchvision's vgg16 saves them)"
        )
    out: dict[str, Tensor] = {}
    for k, (name, index, cin, cout) in enumerate(VGG16_CONVS):
        for part, shape in (("weight", (cout, cin, 3, 3)), ("bias", (cout,))):
            key = f"features.{index}.{part}"
            if key not in state:
                found = ", ".join(sorted(map(str, state))[:6]) or "(none)"
                raise CheckpointError(
                    f"{path}: missing {key!r} ({name}) of a torchvision VGG16 state dict; "
                    f"found keys: {found}"
                )
            tensor = state[key]
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
                got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise CheckpointError(f"{path}: {key!r} ({name}) has shape {got}, expected {shape}")
            out[f"convs.{k}.{part}"] = tensor
    return out


def _valid_scales(scales: Any) -> bool:
    return bool(scales) and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < float(s) <= 4 for s in scales
    )


class D2Net(Method):
    """D2-Net with the S2 training interface (parameters: :attr:`default_params`)."""

    name = "d2net"
    label = "D2-Net"
    default_crop = 256
    default_lr = 1e-4
    default_weight_decay = 1e-5
    #: multiscale None: the ``multiscale`` parameter decides
    extract_options: ClassVar[dict[str, Any]] = {"multiscale": None}
    default_params: ClassVar[dict[str, Any]] = {
        "train_layers": Param(
            "conv4_3",
            "the first VGG16 layer trained, all later ones too (official: conv4_3, the last "
            "layer only), or 'all'",
            choices=("all", *CONV_NAMES),
        ),
        "center_descriptors": Param(
            False,
            "subtract each image's mean feature before normalising the descriptors: from random "
            "weights the descriptors otherwise collapse to one direction (docs/results.md)",
        ),
        "margin": Param(1.0, "triplet margin M", lambda v: v > 0, "a number > 0"),
        "safe_radius": Param(
            4, "negatives closer than this (Chebyshev, feature-map cells) are excluded",
            lambda v: v >= 0, "a non-negative integer",
        ),
        "dilated_extraction": Param(True, "extract with the stride-4 dilated graph (official test time)"),
        "multiscale": Param(False, "extract on the image pyramid by default"),
        "multiscale_scales": Param(
            (0.5, 1.0, 2.0), "the pyramid scales (official: 0.5, 1, 2)", _valid_scales,
            "a non-empty list of scales in (0, 4]",
        ),
        "edge_threshold": Param(5.0, "Hessian edge ratio r of the hard detection (official: 5)",
                                lambda v: v > 0, "a number > 0"),
        "preprocessing": Param(
            "torch",
            "'torch' (ImageNet mean/std; torchvision VGG16 weights) or 'caffe' (BGR, 0-255, "
            "mean subtracted; the official D2-Net weights)",
            choices=("torch", "caffe"),
        ),
    }

    def _init(self) -> None:
        p = self.params
        p["multiscale_scales"] = tuple(sorted(float(s) for s in p["multiscale_scales"]))
        self.backbone = VGG16Conv4()
        if p["preprocessing"] == "torch":
            mean, scale = torch.tensor(_TORCH_MEAN), 1.0 / torch.tensor(_TORCH_STD)
        else:  # caffe: BGR channel order (flipped in dense_features), 0-255, mean subtracted
            mean, scale = torch.tensor(_CAFFE_MEAN_BGR) / 255.0, torch.full((3,), 255.0)
        self.register_buffer("_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_scale", scale.view(1, 3, 1, 1), persistent=False)
        self._freeze()
        log.info(
            "d2net: VGG16 layers randomly initialised (until load_pretrained() or a checkpoint "
            "replaces them)"
        )

    def _freeze(self) -> None:
        layers = self.params["train_layers"]
        first = 0 if layers == "all" else CONV_NAMES.index(layers)
        for k, conv in enumerate(self.backbone.convs):
            conv.requires_grad_(k >= first)

    def load_pretrained(self, path: str) -> None:
        """Load conv1_1..conv4_3 from a torchvision VGG16 state-dict file.

        Raises:
            CheckpointError: unreadable file, or missing / mis-shaped VGG16 keys.
        """
        path = Path(path)
        state = safe_torch_load(path, "VGG16 weight file")
        weights = _check_pretrained_state(state, path)
        with torch.no_grad():
            for key, tensor in weights.items():
                self.backbone.get_parameter(key).copy_(tensor)
        log.info("d2net: VGG16 conv1_1..conv4_3 loaded from %s", path)

    def dense_features(self, images: Tensor, dilated: bool = False) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 512, h, w) raw conv4_3 features."""
        x = images.flip(1) if self.params["preprocessing"] == "caffe" else images
        x = ((x - self._mean) * self._scale).contiguous(memory_format=torch.channels_last)
        # channels-last: faster convolutions, and (B, h*w, C) descriptor views without copies
        return self.backbone(x, dilated)

    def _descriptor_features(self, features: Tensor) -> Tensor:
        """The features descriptors are read from: per image mean-centred where
        ``center_descriptors`` is on (detection always uses the raw features)."""
        if self.params["center_descriptors"]:
            return features - features.mean(dim=(2, 3), keepdim=True)
        return features

    def _forward(self, images: Tensor, dilated: bool = False) -> DenseFeatures:
        """Dense D2-Net outputs.

        Args:
            images: (B, 3, H, W) RGB float in [0, 1].
            dilated: use the stride-4 extraction graph instead of the stride-8 training one.

        Returns:
            DenseFeatures with descriptors (B, 512, h, w), scores (B, 1, h, w) (soft
            detection, sum 1 per image), ``extras["features"]`` the raw features and
            ``stride`` 8 (``h = H // 8``) or 4 (``h = H // 4 - 1``).
        """
        features = self.dense_features(images, dilated)
        return DenseFeatures(
            descriptors=F.normalize(self._descriptor_features(features), dim=1),
            scores=soft_detection_scores(features),
            extras={"features": features},
            stride=4 if dilated else 8,
        )

    def _loss(
        self, out_a: DenseFeatures, out_b: DenseFeatures, flow: Tensor, valid: Tensor
    ) -> dict[str, Tensor]:
        """Score-weighted margin ranking loss over a batch of pairs.

        Args:
            out_a, out_b: outputs for images A and B of each pair (batch B).
            flow: (B, H, W, 2) absolute flow A -> B at A's input resolution.
            valid: (B, H, W) bool.

        Returns:
            ``total`` = ``margin_ranking`` (mean over pairs that have correspondences; 0 when
            none has), ``correspondences`` (mean count per pair, detached).
        """
        cell_b, ok = fmap_correspondences(
            flow,
            valid,
            tuple(out_a.descriptors.shape[-2:]),
            tuple(out_b.descriptors.shape[-2:]),
            out_a.stride,
            out_b.stride,
        )
        per_pair, has = margin_ranking_loss(
            out_a.descriptors,
            out_a.scores,
            out_b.descriptors,
            out_b.scores,
            cell_b,
            ok,
            float(self.params["margin"]),
            int(self.params["safe_radius"]),
        )
        total = per_pair.sum() / has.sum().clamp_min(1)
        return {
            "total": total,
            "margin_ranking": total,
            "correspondences": ok.sum(1).float().mean().detach(),
        }

    def _extract(
        self, image: Tensor, max_keypoints: int, multiscale: bool | None = None
    ) -> Features:
        """Hard-detected keypoints of one image, sorted by soft detection score.

        Args:
            image: (1, 3, H, W) RGB float in [0, 1].
            max_keypoints: K, the most keypoints returned.
            multiscale: run the image pyramid ``multiscale_scales`` (official
                ``process_multiscale``: features summed coarse to fine, cells detected at a
                coarser level banned at finer ones); None uses ``params["multiscale"]``.

        Returns:
            Features: keypoints (N, 2) in input pixels, scores (N,) (soft detection score scaled
            to mean 1 over its map, so levels compare), descriptors (N, 512); N <= K.
        """
        use_pyramid = self.params["multiscale"] if multiscale is None else multiscale
        scales = self.params["multiscale_scales"] if use_pyramid else (1.0,)
        dilated = bool(self.params["dilated_extraction"])
        stride = 4 if dilated else 8
        height, width = image.shape[-2:]
        summed: Tensor | None = None
        banned: Tensor | None = None
        found: list[tuple[Tensor, Tensor, Tensor]] = []
        for scale in scales:
            level = (
                image
                if scale == 1.0
                else F.interpolate(
                    image,
                    scale_factor=scale,
                    mode="bilinear",
                    align_corners=False,
                    antialias=scale < 1,
                )
            )
            features = self.dense_features(level, dilated)
            h, w = features.shape[-2:]
            if summed is not None:
                features = features + F.interpolate(
                    summed, size=(h, w), mode="bilinear", align_corners=False
                )
            summed = features
            cells, refined = hard_detections(features[0], float(self.params["edge_threshold"]))
            if banned is not None:
                banned = (
                    F.interpolate(banned[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0
                )
                fresh = ~banned[cells[:, 0], cells[:, 1]]
                cells, refined = cells[fresh], refined[fresh]
            else:
                banned = torch.zeros(h, w, dtype=torch.bool, device=image.device)
            banned[cells[:, 0], cells[:, 1]] = True
            scores = soft_detection_scores(features)[0, 0] * (h * w)
            xy_level = fmap_to_pixels(refined, stride)
            sx, sy = width / level.shape[-1], height / level.shape[-2]
            xy = torch.stack(
                [(xy_level[:, 0] + 0.5) * sx - 0.5, (xy_level[:, 1] + 0.5) * sy - 0.5], -1
            )
            found.append(
                (xy, scores[cells[:, 0], cells[:, 1]],
                 _sample_descriptors(self._descriptor_features(features)[0], refined))
            )
        xy, scores, desc = (torch.cat(parts) for parts in zip(*found))
        order = torch.argsort(scores, descending=True)[:max_keypoints]
        return Features(xy[order], scores[order], desc[order])
