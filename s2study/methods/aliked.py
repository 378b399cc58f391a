"""ALIKED (Zhao et al., IEEE TIM 2023) through kornia, trained with its authors' loss.

- **Network**: :class:`kornia.feature.ALIKED`, built here without downloading anything and
  initialised from the official weights resolved by name (``aliked-n16``, ...; plain state
  dicts that load strictly apart from the computed buffer ``dkd.hw_grid``). Nothing of the
  architecture is written again: the backbone and its score head give the dense maps, DKD
  (kornia's differentiable keypoint detection) the sub-pixel keypoints, SDDH (its sparse
  deformable descriptor head) the descriptors.
- **Dense outputs** for the S2 wrapper (:class:`~s2study.methods.base.DenseFeatures`, stride
  1): ``scores`` = the score map (B, 1, H, W) in (0, 1), ``descriptors`` = the dense
  L2-normalised feature map (B, dim, H, W) that SDDH samples. ALIKED's descriptors are
  sparse: the loss detects keypoints on the score map and describes them from that map with
  the network's own SDDH, so the descriptor head is trained through the loss.
- **Loss** ``L_f`` (ALIKE, TMM 2022 and ALIKED, TIM 2023), against the dense ground truth
  (flow A -> B and its valid mask, :mod:`s2study.geometry`):

  1. *detection*: the ``train_keypoints`` highest NMS maxima of each score map (window
     ``2 * nms_radius + 1``), refined to sub-pixel by DKD's soft-argmax, with their score
     (the map read bilinearly there) and their score dispersity;
  2. *correspondence*: ``p_A`` maps to ``W(p_A)``, the flow read bilinearly at ``p_A``
     (valid when all four flow samples are); ``(p_A, p_B)`` is a ground-truth match when
     ``W(p_A)`` and ``p_B`` are mutual nearest neighbours closer than ``gt_threshold`` px;
  3. ``L_rp``, the *reprojection loss* of the sub-pixel keypoints, per match
     ``(|W(p_A) - p_B| + |p_A - W^-1(p_B)|) / 2``; the flow has no inverse, so
     ``W^-1(p_B) = p_A + J^-1 (p_B - W(p_A))`` with ``J`` the flow's Jacobian at ``p_A``
     (central differences, exact for affine maps, to second order for homographies);
  4. ``L_pk``, the *dispersity peak loss*: the mean score dispersity of the detected
     keypoints (the softmax-weighted mean squared distance, in window radii, of the window's
     pixels to the keypoint: DKD's own measure), which makes the score map peak at them;
  5. ``L_ds``, the *sparse NRE loss*: per match, the cross-entropy between the one-hot
     reprojection probability and the matching probability
     ``softmax_j((d_A . d_B^j - 1) / t_des)`` over the keypoints of B, and the same from B to
     A; mean over both directions;
  6. ``L_rl``, the *reliability loss*: with ``r`` the matching probability of a matched
     keypoint's true match at temperature ``t_rel`` (no gradient), per image
     ``sum((1 - r) s) / sum(s)`` over its matched keypoints' scores ``s``: unreliable
     keypoints lose score to reliable ones;

  ``total = w_rp L_rp + w_pk L_pk + w_ds L_ds + w_rl L_rl`` with the published weights 1,
  0.5, 5, 1. A pair without matches contributes to ``L_pk`` only. Where the papers leave a
  detail to their code (keypoints per training image, the matching threshold, the
  temperatures), the defaults are parameters and say which value is ours.
- **Extraction**: the top K local maxima of the score map (``detection_threshold`` 0, the
  evaluation protocol's keypoints; a positive value keeps only maxima above it, as kornia's
  threshold mode), sub-pixel, scored by the map, described by SDDH.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from s2study.errors import CheckpointError
from s2study.features import Features
from s2study.methods.base import DenseFeatures, Method, Param

MODEL_NAMES = ("aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32")
#: the buffer kornia computes (not in the official files)
COMPUTED_BUFFERS = ("dkd.hw_grid",)


def _kornia_aliked():
    from kornia.feature import ALIKED
    from kornia.feature.aliked.aliked import _ALIKED_CFGS, DKD

    return ALIKED, DKD, _ALIKED_CFGS


# ----------------------------------------------------------------------------- geometry


def _pixel_grid(xy: Tensor, height: int, width: int) -> Tensor:
    """Pixel ``(x, y)`` (N, 2) -> a ``grid_sample`` grid (1, 1, N, 2), align_corners=True."""
    scale = xy.new_tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)])
    return (xy * scale - 1).view(1, 1, -1, 2)


def warp_points(xy: Tensor, flow: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``W(p)``: the flow read bilinearly at sub-pixel points (differentiable in ``xy``).

    Args:
        xy: (N, 2) pixel ``(x, y)`` in A.
        flow: (H, W, 2) absolute flow A -> B; valid: (H, W) bool.

    Returns:
        ``warped`` (N, 2) in B's pixels and ``ok`` (N,) bool: inside A, every flow sample
        used valid, and finite.
    """
    height, width = flow.shape[:2]
    grid = _pixel_grid(xy, height, width).to(flow.dtype)
    warped = F.grid_sample(flow.permute(2, 0, 1)[None], grid, align_corners=True)[0, :, 0].t()
    support = F.grid_sample(valid[None, None].to(flow.dtype), grid.detach(), align_corners=True)
    ok = (support[0, 0, 0] > 1 - 1e-4) & torch.isfinite(warped).all(-1)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= width - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= height - 1)
    return torch.where(ok[:, None], warped, torch.zeros_like(warped)), ok & inside


def flow_jacobian(xy: Tensor, flow: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """The flow's Jacobian ``dW/dp`` at points, by central differences of 1 px (no gradient).

    Returns:
        ``J`` (N, 2, 2) with ``J[:, :, 0] = dW/dx`` and ``J[:, :, 1] = dW/dy``, and ``ok`` (N,)
        bool (all four samples valid).
    """
    xy = xy.detach()
    ex, ey = xy.new_tensor([1.0, 0.0]), xy.new_tensor([0.0, 1.0])
    samples = [warp_points(xy + d, flow, valid) for d in (ex, -ex, ey, -ey)]
    (px, okx1), (mx, okx2), (py, oky1), (my, oky2) = samples
    jac = torch.stack([(px - mx) / 2, (py - my) / 2], dim=-1)
    return jac, okx1 & okx2 & oky1 & oky2


def mutual_matches(warped_a: Tensor, ok_a: Tensor, xy_b: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Ground-truth matches: ``W(p_A)`` and ``p_B`` mutual nearest neighbours within
    ``threshold`` px (no gradient).

    Returns:
        ``ia``, ``ib`` (M,) long indices into A's and B's keypoints.
    """
    empty = torch.zeros(0, dtype=torch.long, device=xy_b.device)
    if warped_a.shape[0] == 0 or xy_b.shape[0] == 0 or not bool(ok_a.any()):
        return empty, empty
    dist = torch.cdist(warped_a.detach(), xy_b.detach())
    dist = dist.masked_fill(~ok_a[:, None], float("inf"))
    ab = dist.argmin(1)
    ba = dist.argmin(0)
    ia = torch.arange(warped_a.shape[0], device=xy_b.device)
    keep = ok_a & (ba[ab] == ia) & (dist[ia, ab] < threshold)
    return ia[keep], ab[keep]


# ----------------------------------------------------------------------------- loss parts


def _norm(v: Tensor) -> Tensor:
    """|v| along the last axis, with a finite gradient at 0."""
    return (v.square().sum(-1) + 1e-12).sqrt()


def reprojection_loss(
    warped_a: Tensor, xy_b: Tensor, jac_a: Tensor, ia: Tensor, ib: Tensor
) -> Tensor:
    """Per match ``(|W(p_A) - p_B| + |p_A - W^-1(p_B)|) / 2``, with
    ``p_A - W^-1(p_B) = J^-1 (W(p_A) - p_B)`` (the first-order inverse of the flow).

    Args:
        warped_a: (N_A, 2) ``W(p_A)``; xy_b: (N_B, 2); jac_a: (N_A, 2, 2) ``dW/dp`` at p_A;
        ia, ib: (M,) matches.

    Returns:
        (M,) per-match loss in pixels.
    """
    err = warped_a[ia] - xy_b[ib]  # in B
    back = torch.linalg.solve(jac_a[ia], err[..., None])[..., 0]  # in A
    return (_norm(err) + _norm(back)) / 2


def sparse_nre_loss(desc_a: Tensor, desc_b: Tensor, ia: Tensor, ib: Tensor, t_des: float) -> Tensor:
    """Sparse NRE (ALIKED): ``-log softmax_j((d_A . d_B^j - 1) / t_des)`` at the true match,
    over the keypoints of the other image, in both directions.

    Args:
        desc_a: (N_A, D), desc_b: (N_B, D) L2-normalised; ia, ib: (M,) matches.

    Returns:
        (2 M,) per-match losses, A -> B then B -> A.
    """
    ab = F.log_softmax((desc_a[ia] @ desc_b.t() - 1) / t_des, dim=1)
    ba = F.log_softmax((desc_b[ib] @ desc_a.t() - 1) / t_des, dim=1)
    rows = torch.arange(ia.shape[0], device=ia.device)
    return -torch.cat([ab[rows, ib], ba[rows, ia]])


def reliability_loss(
    desc_a: Tensor, desc_b: Tensor, score_a: Tensor, score_b: Tensor, ia: Tensor, ib: Tensor,
    t_rel: float,
) -> Tensor:
    """Reliability loss: ``sum((1 - r) s) / sum(s)`` over each image's matched keypoints,
    ``r`` the matching probability of the true match at temperature ``t_rel`` (detached).

    Returns:
        (2,) the loss of A's matched keypoints and of B's.
    """
    rows = torch.arange(ia.shape[0], device=ia.device)
    with torch.no_grad():
        r_a = F.softmax((desc_a[ia] @ desc_b.t() - 1) / t_rel, dim=1)[rows, ib]
        r_b = F.softmax((desc_b[ib] @ desc_a.t() - 1) / t_rel, dim=1)[rows, ia]
    s_a, s_b = score_a[ia], score_b[ib]
    return torch.stack([
        ((1 - r_a) * s_a).sum() / s_a.sum().clamp_min(1e-12),
        ((1 - r_b) * s_b).sum() / s_b.sum().clamp_min(1e-12),
    ])


# ----------------------------------------------------------------------------- weights


def _state_dict_of(obj: Any) -> dict[str, Any] | None:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and "format" not in obj:
        obj = obj["state_dict"]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return obj
    return None


def _looks_like_aliked(state: dict[str, Any] | None) -> bool:
    return state is not None and "block1.conv1.weight" in state and "desc_head.agg_weights" in state


def read_aliked_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict of an ALIKED weight file (an official ``.pth``), read safely.

    Raises:
        CheckpointError: unreadable, or not an ALIKED state dict.
    """
    from s2study.checkpoint import safe_torch_load

    state = _state_dict_of(safe_torch_load(Path(path), "ALIKED weight file"))
    if not _looks_like_aliked(state):
        found = ", ".join(sorted(map(str, state))[:6]) if state else "no string keys"
        raise CheckpointError(
            f"{path}: not an ALIKED state dict (expected keys such as 'block1.conv1.weight' and "
            f"'desc_head.agg_weights', found {found})"
        )
    return {k: v for k, v in state.items() if k not in COMPUTED_BUFFERS}


def model_name_of(path: str | Path) -> str:
    """The ``model_name`` of an ALIKED weight file: the resolver's entry with the file's
    content or name, else the architecture its shapes imply (``n16`` and ``n16rot`` share
    one; a renamed ``n16rot`` file reads as ``n16``)."""
    from s2study.features import file_digest
    from s2study.resolver import WEIGHTS

    path = Path(path)
    entries = [w for w in WEIGHTS.values() if w.method == "aliked"]
    digest = file_digest(path)
    for w in entries:
        if w.sha256 == digest:
            return w.name
    for w in entries:
        if w.file == path.name or w.name == path.stem:
            return w.name
    state = read_aliked_weights(path)
    dim = state["desc_head.sf_conv.weight"].shape[0]
    n_pos = state["desc_head.agg_weights"].shape[0]
    _, _, configs = _kornia_aliked()
    for name in MODEL_NAMES:
        if (configs[name][4], configs[name][6]) == (dim, n_pos):
            return name
    raise CheckpointError(f"{path}: no ALIKED model has dim {dim} and {n_pos} sampling positions")


# ----------------------------------------------------------------------------- the method


def _positive(doc: str, default: float) -> Param:
    return Param(default, doc, lambda v: v > 0, "a number > 0")


def _weight(doc: str, default: float) -> Param:
    return Param(default, doc, lambda v: v >= 0, "a non-negative number")


class ALIKED(Method):
    """ALIKED through :class:`kornia.feature.ALIKED` (see the module docstring).

    The training schedule defaults are the project's R2D2 fine-tuning schedule (no
    published schedule for fine-tuning ALIKED on a new modality pair): lr 1e-4,
    weight decay 5e-4, 192 px crops (a multiple of 32, ALIKED's padding unit).
    """

    name = "aliked"
    label = "ALIKED"
    default_crop = 192
    default_lr = 1e-4
    default_weight_decay = 5e-4
    extract_options: ClassVar[dict[str, Any]] = {}
    default_params: ClassVar[dict[str, Any]] = {
        "model_name": Param(
            "aliked-n16",
            "the network: aliked-t16 (tiny, 64-d), aliked-n16, aliked-n16rot (trained with "
            "rotations), aliked-n32 (32 sampling positions); implied by method.weights",
            choices=MODEL_NAMES,
        ),
        "pretrained": Param(
            True,
            "start from the official weights of model_name when method.weights names none "
            "(false: kornia's random initialisation)",
        ),
        "nms_radius": Param(
            2, "radius of the NMS and soft-argmax window (kernel 2 r + 1; official: 2)",
            lambda v: v >= 1, "a positive integer",
        ),
        "detection_threshold": Param(
            0.0,
            "extraction: least score of a keypoint; 0 keeps the top K local maxima (the "
            "evaluation protocol's keypoints; kornia's default 0.2 would leave fewer)",
            lambda v: 0 <= v < 1, "a number in [0, 1)",
        ),
        "train_keypoints": Param(
            400, "training: keypoints detected per image (the top NMS maxima; our default)",
            lambda v: v > 0, "a positive integer",
        ),
        "gt_threshold": _positive(
            "training: largest reprojection distance of a ground-truth match, px (ALIKE: 5)", 5.0
        ),
        "t_des": _positive("temperature of the sparse NRE matching probability (ALIKE: 0.02)", 0.02),
        "t_rel": _positive("temperature of the reliability's matching probability (ALIKE: 1)", 1.0),
        "w_rp": _weight("weight of the reprojection loss (published: 1)", 1.0),
        "w_pk": _weight("weight of the dispersity peak loss (published: 0.5)", 0.5),
        "w_ds": _weight("weight of the sparse NRE descriptor loss (published: 5)", 5.0),
        "w_rl": _weight("weight of the reliability loss (published: 1)", 1.0),
    }

    def _init(self) -> None:
        kornia_aliked, _, _ = _kornia_aliked()
        p = self.params
        # detection_threshold <= 0 and max_num_keypoints -1: kornia's own detector is unused
        # here (extraction and the loss build theirs), so nothing downloads or thresholds
        self.net = kornia_aliked(p["model_name"], max_num_keypoints=-1, detection_threshold=0.2,
                                 nms_radius=p["nms_radius"])

    @classmethod
    def default_weights(cls, params: dict[str, Any]) -> str | None:
        """The official weights of ``model_name`` (``pretrained: true``), else none."""
        return params["model_name"] if params["pretrained"] else None

    # -- network ----------------------------------------------------------------------------

    def _forward(self, images: Tensor) -> DenseFeatures:
        """Dense maps: scores (B, 1, H, W) in (0, 1), descriptors (B, dim, H, W)
        L2-normalised (the feature map SDDH samples); images RGB in [0, 1], no normalisation
        (the pretrained weights' convention)."""
        feature_map, score_map = self.net.extract_dense_map(images)
        return DenseFeatures(descriptors=feature_map, scores=score_map, stride=1)

    def _detector(self, top_k: int, threshold: float = 0.0, device: torch.device | None = None):
        _, dkd, _ = _kornia_aliked()
        r = self.params["nms_radius"]
        if threshold > 0:
            det = dkd(radius=r, top_k=-1, scores_th=threshold, n_limit=top_k)
        else:
            det = dkd(radius=r, top_k=top_k)
        return det.to(device)

    def detect(self, scores: Tensor, features: Tensor, top_k: int, threshold: float = 0.0):
        """Keypoints of each image of a batch of dense maps, described by SDDH.

        Args:
            scores: (B, 1, H, W) score maps; features: (B, dim, H, W) feature maps.
            top_k: the most keypoints per image.
            threshold: > 0: only maxima above it (kornia's threshold mode).

        Returns:
            Per image: ``xy`` (N, 2) sub-pixel pixel ``(x, y)``, ``scores`` (N,), ``dispersity``
            (N,), ``descriptors`` (N, dim); all differentiable in the maps (the NMS is not).
        """
        height, width = scores.shape[-2:]
        det = self._detector(top_k, threshold, scores.device)
        keypoints, kp_scores, dispersity = det(scores)
        descriptors, _ = self.net.desc_head(features, keypoints)
        wh = scores.new_tensor([width - 1, height - 1])
        return [
            {"xy": (k + 1) / 2 * wh, "scores": s, "dispersity": d, "descriptors": desc}
            for k, s, d, desc in zip(keypoints, kp_scores, dispersity, descriptors)
        ]

    # -- weights ----------------------------------------------------------------------------

    @classmethod
    def recognizes(cls, obj: Any) -> bool:
        """A plain ALIKED state dict (the official ``.pth`` files)."""
        return _looks_like_aliked(_state_dict_of(obj))

    @classmethod
    def pretrained_params(cls, path: str | Path) -> dict[str, Any]:
        """``model_name`` from the weights file (its resolver entry, else its shapes)."""
        return {"model_name": model_name_of(path)}

    def load_pretrained(self, path: str | Path) -> None:
        """Load an ALIKED state dict strictly (every key and shape), apart from the buffer
        kornia computes (``dkd.hw_grid``).

        Raises:
            CheckpointError: unreadable, not ALIKED, or keys / shapes that do not fit
                ``model_name`` (the message names the file and the mismatches).
        """
        state = read_aliked_weights(path)
        expected = {k: v for k, v in self.net.state_dict().items() if k not in COMPUTED_BUFFERS}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [
            f"{k} (file {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, "
            f"model {tuple(expected[k].shape)})"
            for k, v in state.items()
            if k in expected and (not isinstance(v, Tensor) or v.shape != expected[k].shape)
        ]
        problems = [
            f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
            for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("wrong shapes", wrong))
            if items
        ]
        if problems:
            raise CheckpointError(
                f"{path}: weights do not fit the ALIKED {self.params['model_name']} network "
                f"({'; '.join(problems)})"
            )
        for key in COMPUTED_BUFFERS:
            state[key] = self.net.state_dict()[key]
        self.net.load_state_dict(state, strict=True)

    # -- loss -------------------------------------------------------------------------------

    def _loss(
        self, out_a: DenseFeatures, out_b: DenseFeatures, flow: Tensor, valid: Tensor
    ) -> dict[str, Tensor]:
        """The ALIKE / ALIKED loss (module docstring) over a batch of pairs.

        Returns:
            ``total`` and its parts ``reprojection``, ``peaky``, ``nre``, ``reliability``,
            plus ``matches`` (mean ground-truth matches per pair, detached).
        """
        p = self.params
        device = flow.device
        flow, valid = flow.float(), valid.bool()
        # the sparse steps in float32 (under autocast the maps come in bf16: too coarse for
        # sub-pixel positions, and half-precision grid_sample is unreliable on CPU)
        with torch.autocast(device.type, enabled=False):
            maps = [(o.scores.float(), o.descriptors.float()) for o in (out_a, out_b)]
            det_a, det_b = (self.detect(s, f, p["train_keypoints"]) for s, f in maps)
            zero = flow.new_zeros(())
            rp_sum, rp_n, ds_sum, ds_n, rl_sum, rl_n = zero, 0, zero, 0, zero, 0
            pk = torch.cat([d["dispersity"] for d in det_a + det_b])
            matches = 0
            for b, (a, bb) in enumerate(zip(det_a, det_b)):
                warped, ok = warp_points(a["xy"], flow[b], valid[b])
                jac, ok_jac = flow_jacobian(a["xy"], flow[b], valid[b])
                det = torch.linalg.det(jac)
                ok = ok & ok_jac & (det.abs() > 1e-6)
                ia, ib = mutual_matches(warped, ok, bb["xy"], p["gt_threshold"])
                matches += int(ia.numel())
                if ia.numel() == 0:
                    continue
                rp = reprojection_loss(warped, bb["xy"], jac, ia, ib)
                rp_sum, rp_n = rp_sum + rp.sum(), rp_n + rp.numel()
                ds = sparse_nre_loss(a["descriptors"], bb["descriptors"], ia, ib, p["t_des"])
                ds_sum, ds_n = ds_sum + ds.sum(), ds_n + ds.numel()
                rl = reliability_loss(a["descriptors"], bb["descriptors"], a["scores"],
                                      bb["scores"], ia, ib, p["t_rel"])
                rl_sum, rl_n = rl_sum + rl.sum(), rl_n + rl.numel()
            reprojection = rp_sum / max(rp_n, 1)
            nre = ds_sum / max(ds_n, 1)
            reliability = rl_sum / max(rl_n, 1)
            peaky = pk.mean() if pk.numel() else zero
            total = (p["w_rp"] * reprojection + p["w_pk"] * peaky + p["w_ds"] * nre
                     + p["w_rl"] * reliability)
        return {
            "total": total,
            "reprojection": reprojection,
            "peaky": peaky,
            "nre": nre,
            "reliability": reliability,
            "matches": torch.tensor(matches / max(len(det_a), 1), device=device),
        }

    # -- extraction -------------------------------------------------------------------------

    def _extract(self, image: Tensor, max_keypoints: int) -> Features:
        """The top K local maxima of the score map (above ``detection_threshold`` when it
        is positive), sub-pixel, with their scores and SDDH descriptors, best first."""
        if max_keypoints == 0:
            dim = self.net.desc_head.sf_conv.weight.shape[0]
            empty = image.new_zeros(0)
            return Features(image.new_zeros(0, 2), empty, image.new_zeros(0, dim))
        out = self(image)
        found = self.detect(out.scores, out.descriptors, max_keypoints,
                            self.params["detection_threshold"])[0]
        order = torch.argsort(found["scores"], descending=True)[:max_keypoints]
        return Features(found["xy"][order], found["scores"][order], found["descriptors"][order])

