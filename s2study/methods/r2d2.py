"""R2D2 (Revaud et al., NeurIPS 2019): repeatable and reliable detector and descriptor.

- **Network** (the official ``Quad_L2Net_ConfCFS``): an L2-Net-style trunk of nine
  convolutions at full resolution (3x3 convolutions whose dilation doubles where L2-Net
  strides, the final 8x8 convolution replaced by three dilated 2x2 ones), batch norm without
  affine parameters, ReLU; 128-d L2-normalised descriptors; two 1x1 heads on the squared
  features: ``clf`` (2 channels, softmax) gives the *reliability*, ``sal`` (1 channel,
  ``u / (1 + u)`` with ``u = softplus``) the *repeatability*. The module layout is the
  official one, so the official state dict loads strictly once ``module.`` is stripped.
  The official ``Fast_Quad_L2Net_ConfCFS`` (``faster2d2``, ``downsample_factor`` 2) is the
  same net with a 2x2 max-pool after the third convolution (whose stride, and so dilation
  doubling, it replaces) and a bilinear upsampling back to full resolution before the heads.
- **Loss** (the official ``MultiLoss``): reliability-weighted AP loss on descriptors sampled
  as the official ``NghSampler2`` does (random queries, positives within ``pos_d`` px of the
  ground truth with max-pooling, negatives on the ring ``neg_d``..``ngh`` plus random
  distractors from the whole batch), a differentiable AP with ``nq`` triangular bins,
  computed here as a two-bin scatter per score instead of the official ``N x nq x M``
  quantiser tensor; the cosine-similarity repeatability loss on ``N x N`` patches and the
  peakiness loss.
- **Extraction** (the official ``extract.py``): 3x3 non-maximum suppression of the
  repeatability, reliability and repeatability thresholds, score ``rep * rel``, optionally on
  the official image pyramid.

Deliberate departures from the official code, all at the edges of its behaviour:

- queries are drawn among the *valid* pixels (the official code draws them anywhere and
  masks afterwards), so pairs where only a fraction of the pixels correspond still train;
- negatives that fall outside image B and distractors near the ground truth are dropped from
  the ranking (the official code clamps the former onto the border and scores the latter 0);
- the cosine-similarity loss ignores invalid pixels and weighs each patch by its valid
  fraction (the official code compares them with border-padded values); pairs without any
  correspondence contribute nothing to any part of the loss;
- the flow is sampled with ``align_corners=True`` to match its normalisation, and pyramid
  keypoints are mapped back with pixel-centre alignment ``(x + 0.5) * W / w - 0.5``
  (the official code mixes conventions, off by half a pixel);
- the Fast net upsamples to exactly the input size (the official ``Upsample(scale_factor=2)``
  gives maps one pixel short where the height or width is odd; the same values otherwise).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2study.checkpoint import safe_torch_load
from s2study.errors import CheckpointError
from s2study.features import Features
from s2study.methods.base import DenseFeatures, Method, Param, check_shape
from s2study.part_norm import group_sizes, grouped_batch_norm_stats

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: official architecture names -> the :class:`R2D2` architecture parameters they stand for
#: (with the official defaults); only these names are accepted from a checkpoint's ``net``
#: string, and only the keywords of :data:`OFFICIAL_KEYWORDS`
OFFICIAL_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "Quad_L2Net_ConfCFS": {"dim": 128, "mchan": 4, "relu22": False, "downsample_factor": 1},
    "Fast_Quad_L2Net_ConfCFS": {"dim": 128, "mchan": 4, "relu22": False, "downsample_factor": 2},
}

#: the keyword arguments each official constructor takes (``Quad_L2Net`` has no
#: ``downsample_factor``: it is the full-resolution net, ``downsample_factor`` 1 here)
OFFICIAL_KEYWORDS: dict[str, tuple[str, ...]] = {
    "Quad_L2Net_ConfCFS": ("dim", "mchan", "relu22"),
    "Fast_Quad_L2Net_ConfCFS": ("dim", "mchan", "relu22", "downsample_factor"),
}

_CALL_RE = re.compile(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*", re.DOTALL)
_ARG_RE = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*(.+?)\s*")
_INT_RE = re.compile(r"[-+]?\d+")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")


# ----------------------------------------------------------------------------- checkpoints


def _literal(text: str, source: str) -> Any:
    """A literal int, float or bool from a checkpoint string; anything else is refused."""
    if text in ("True", "False"):
        return text == "True"
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    raise CheckpointError(
        f"{source}: architecture argument {text!r} is not a literal number or bool "
        "(the architecture string is parsed, never evaluated)"
    )


def official_checkpoint_params(net_string: str, source: str = "checkpoint") -> dict[str, Any]:
    """Parse an official checkpoint's ``net`` string against the architecture whitelist.

    Args:
        net_string: e.g. ``"Quad_L2Net_ConfCFS()"``, ``"Quad_L2Net_ConfCFS(dim=128)"`` or
            ``"Fast_Quad_L2Net_ConfCFS()"``; only the constructor's keyword arguments
            (:data:`OFFICIAL_KEYWORDS`) with literal values are accepted.
        source: what to name in error messages (the file).

    Returns:
        The architecture parameters of :class:`R2D2` (``dim``, ``mchan``, ``relu22``,
        ``downsample_factor``).

    Raises:
        CheckpointError: not a call of a whitelisted architecture with known literal keywords,
            or a ``Fast_Quad_L2Net_ConfCFS`` whose ``downsample_factor`` is not a power of two
            >= 2 (with 1 the official Fast net is neither it nor ``Quad_L2Net``: no pooling,
            no dilation doubling at the third convolution).
    """
    if not isinstance(net_string, str):
        raise CheckpointError(
            f"{source}: 'net' is a {type(net_string).__name__}, expected a string"
        )
    call = _CALL_RE.fullmatch(net_string)
    known = ", ".join(OFFICIAL_ARCHITECTURES)
    if call is None or call.group(1) not in OFFICIAL_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: architecture {net_string[:80]!r} is not supported; known: {known}"
        )
    name, body = call.group(1), call.group(2)
    params, keywords = dict(OFFICIAL_ARCHITECTURES[name]), OFFICIAL_KEYWORDS[name]
    for item in filter(str.strip, body.split(",")):
        arg = _ARG_RE.fullmatch(item)
        if arg is None or arg.group(1) not in keywords:
            raise CheckpointError(
                f"{source}: argument {item.strip()!r} of {name} is not supported; "
                f"allowed keywords: {', '.join(keywords)}"
            )
        value = _literal(arg.group(2), source)
        if type(value) is not type(params[arg.group(1)]):
            raise CheckpointError(
                f"{source}: {name} argument {arg.group(1)}={value!r} should be a "
                f"{type(params[arg.group(1)]).__name__}"
            )
        params[arg.group(1)] = value
    factor = params["downsample_factor"]
    if name.startswith("Fast_") and (factor < 2 or factor & (factor - 1)):
        raise CheckpointError(
            f"{source}: {name} argument downsample_factor={factor} is not supported; "
            "expected a power of two >= 2"
        )
    return params


def is_official_checkpoint(obj: Any) -> bool:
    """True for a dict in the official format: ``{"net": str, "state_dict": {...}}``."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("net"), str)
        and isinstance(obj.get("state_dict"), dict)
        and "format" not in obj
    )


def strip_module_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official ``DataParallel`` keys ``module.ops.0.weight`` -> ``ops.0.weight``."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read an official R2D2 checkpoint safely (``weights_only=True``).

    Returns:
        ``(params, state_dict)``: the architecture parameters and the state dict with the
        ``module.`` prefix stripped.

    Raises:
        CheckpointError: missing, unreadable, not in the official format, or an architecture
            outside the whitelist.
    """
    path = Path(path)
    obj = safe_torch_load(path, "checkpoint")
    if not is_official_checkpoint(obj):
        keys = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not an official R2D2 checkpoint (expected keys 'net' and 'state_dict', "
            f"found {keys})"
        )
    return official_checkpoint_params(obj["net"], str(path)), strip_module_prefix(obj["state_dict"])


# ----------------------------------------------------------------------------- network


def _trunk_spec(
    dim: int, mchan: int, relu22: bool, downsample_factor: int = 1
) -> list[tuple[int, int, int, bool, bool, int]]:
    """(out channels, kernel, L2-Net stride, batch norm, relu, max-pool kernel) of the nine
    convolutions; ``downsample_factor`` > 1 is the official ``Fast_Quad_L2Net``, whose third
    convolution keeps stride 1 and is followed by a max-pool of that kernel instead."""
    fast = downsample_factor > 1
    return [
        (8 * mchan, 3, 1, True, True, 1),
        (8 * mchan, 3, 1, True, True, 1),
        (16 * mchan, 3, 1 if fast else 2, True, True, downsample_factor),
        (16 * mchan, 3, 1, True, True, 1),
        (32 * mchan, 3, 2, True, True, 1),
        (32 * mchan, 3, 1, True, True, 1),
        (32 * mchan, 2, 2, True, relu22, 1),
        (32 * mchan, 2, 2, True, relu22, 1),
        (dim, 2, 2, False, False, 1),
    ]


def _build_trunk(
    dim: int, mchan: int, relu22: bool, downsample_factor: int = 1
) -> tuple[nn.ModuleList, list[tuple[int, int | None, bool, int]]]:
    """The official ``ops`` list and its stages ``(conv index, bn index | None, relu, pool)``.

    The official net keeps full resolution: an L2-Net stride becomes a doubling of the
    dilation of the *following* convolutions, with "same" padding ``(k - 1) * d // 2``.
    With ``downsample_factor`` > 1 (``Fast_Quad_L2Net``) the third stage ends with a
    ``MaxPool2d(downsample_factor)`` and the list with an ``Upsample`` by that factor back to
    the input resolution; these modules hold no weights but take their official places, so
    the indices of the later weights are the official ones.
    """
    ops, stages, dilation, chan = nn.ModuleList(), [], 1, 3
    for out, k, stride, bn, relu, pool in _trunk_spec(dim, mchan, relu22, downsample_factor):
        conv_at = len(ops)
        ops.append(nn.Conv2d(chan, out, k, padding=(k - 1) * dilation // 2, dilation=dilation))
        bn_at = None
        if bn:
            bn_at = len(ops)
            ops.append(nn.BatchNorm2d(out, affine=False))
        if relu:
            ops.append(nn.ReLU(inplace=True))
        if pool > 1:
            ops.append(nn.MaxPool2d(kernel_size=pool))
        stages.append((conv_at, bn_at, relu, pool))
        dilation *= stride
        chan = out
    if downsample_factor > 1:
        ops.append(
            nn.Upsample(scale_factor=downsample_factor, mode="bilinear", align_corners=False)
        )
    return ops, stages


def _to_input_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    """The Fast net's final bilinear upsampling, to exactly the input size ``(H, W)``.

    The same as the official ``Upsample(scale_factor=downsample_factor)`` where the factor
    divides H and W; for other sizes the official map comes out short of the input.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Convolution weights with an affine-free eval-mode batch norm folded in."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return conv.weight * scale.view(-1, 1, 1, 1), (conv.bias - bn.running_mean) * scale


class _BatchNormKeepOutput(torch.autograd.Function):
    """Train-mode batch norm without affine parameters that saves its *output* for backward.

    With ``y = (x - mean) * invstd``, ``dx = invstd * (dy - mean(dy) - y * mean(dy * y))``:
    the output is enough, so the convolution output ``x`` can be freed as soon as ``y`` exists
    (the native batch norm keeps ``x``, and the next layer keeps ``y`` as well).
    """

    @staticmethod
    def forward(ctx, x: Tensor, bn: nn.BatchNorm2d) -> Tensor:  # type: ignore[override]
        sizes = group_sizes(x.shape[0])  # the S2 batch's parts, each with its own statistics
        if sizes is None:
            y, _, invstd = torch.native_batch_norm(
                x, None, None, bn.running_mean, bn.running_var, True, bn.momentum, bn.eps
            )
            sizes, invstd = (x.shape[0],), invstd[None]
        else:
            y, invstd = grouped_batch_norm_stats(x, bn, sizes)
        bn.num_batches_tracked.add_(1)
        ctx.save_for_backward(y, invstd)
        ctx.sizes = list(sizes)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        y, invstd = ctx.saved_tensors
        # the native backward with mean 0 and invstd 1 normalises nothing: it computes
        # dy - mean(dy) - y * mean(dy * y) (per part); the real invstd then scales it
        unit = torch.ones_like(invstd[0])
        dx = [
            torch.ops.aten.native_batch_norm_backward(
                g, yi, None, None, None, torch.zeros_like(unit), unit, True, 0.0, [True, False, False]
            )[0] * inv.view(1, -1, 1, 1)
            for g, yi, inv in zip(dy.split(ctx.sizes), y.split(ctx.sizes), invstd)
        ]
        return (dx[0] if len(dx) == 1 else torch.cat(dx)).to(y.dtype), None


class _ReluConv(torch.autograd.Function):
    """``conv2d(relu(y))`` that keeps only ``y`` for backward and recomputes the ReLU.

    Together with :class:`_BatchNormKeepOutput` a conv -> BN -> ReLU stage keeps one
    activation tensor for backward instead of two. Under autocast the convolution runs in the
    autocast dtype, as ``F.conv2d`` would.
    """

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, bias: Tensor, padding, dilation) -> Tensor:  # type: ignore[override]
        device = y.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w, b = weight.to(dtype), bias.to(dtype)
        with torch.autocast(device, enabled=False):
            out = F.conv2d(F.relu(y).to(dtype), w, b, 1, padding, dilation)
        ctx.save_for_backward(y, w)
        ctx.conv = (padding, dilation, weight.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y, w = ctx.saved_tensors
        padding, dilation, w_dtype, b_dtype = ctx.conv
        z = F.relu(y).to(w.dtype)
        gz, gw, gb = torch.ops.aten.convolution_backward(
            grad.to(w.dtype), z, w, [w.shape[0]], [1, 1], list(padding), list(dilation),
            False, [0, 0], 1, [True, True, True],
        )
        gy = (gz * (y > 0)).to(y.dtype)
        return gy, gw.to(w_dtype), gb.to(b_dtype), None, None


# ----------------------------------------------------------------------------- loss terms


def neighbourhood_offsets(ngh: int, subd: int, pos_d: int, neg_d: int) -> tuple[Tensor, Tensor]:
    """Pixel offsets ``(dx, dy)`` of the positives and ring negatives around a ground truth.

    Offsets lie on a grid of step ``subd`` within radius ``ngh``; positives are those with
    ``|o| <= pos_d``, negatives those with ``neg_d <= |o| <= ngh`` (the official layout).

    Returns:
        ``pos`` (P, 2) and ``neg`` (K, 2) int64.
    """
    r = (ngh // subd) * subd
    steps = torch.arange(-r, r + 1, subd)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    off = torch.stack([dx.reshape(-1), dy.reshape(-1)], dim=1)
    d2 = (off**2).sum(1)
    return off[d2 <= pos_d**2], off[(d2 >= neg_d**2) & (d2 <= ngh**2)]


def _inner_box(height: int, width: int, border: int) -> tuple[int, int, int]:
    """The border actually used (shrunk for tiny images) and the inner height and width."""
    b = max(0, min(border, (min(height, width) - 1) // 2))
    return b, height - 2 * b, width - 2 * b


def sample_positions(mask: Tensor, border: int, step: int) -> tuple[Tensor, Tensor]:
    """Sample pixel positions inside a border, as the official ``gen_grid`` does.

    ``step > 0``: a regular grid of that step. ``step < 0``: ``area / step**2`` random
    positions per image, drawn without replacement among the pixels where ``mask`` is True
    (then among the others when there are too few).

    Args:
        mask: (B, H, W) bool, the pixels worth sampling.
        border: pixels left out on each side.
        step: grid step (> 0) or minus the mean spacing of random samples (< 0).

    Returns:
        ``xy`` (B, n, 2) int64 positions ``(x, y)`` and ``ok`` (B, n) bool (mask at xy).
    """
    bsz, height, width = mask.shape
    b, hi, wi = _inner_box(height, width, border)
    inner = mask[:, b : b + hi, b : b + wi].reshape(bsz, -1)
    if step > 0:
        ys = torch.arange(0, hi, step, device=mask.device)
        xs = torch.arange(0, wi, step, device=mask.device)
        idx = (ys[:, None] * wi + xs[None, :]).reshape(1, -1).expand(bsz, -1)
    else:
        n = max(1, hi * wi // step**2)
        priority = torch.rand(bsz, hi * wi, device=mask.device) + inner.to(torch.float32)
        idx = priority.topk(n, dim=1, sorted=False).indices
    xy = torch.stack([idx % wi + b, idx // wi + b], dim=-1)
    return xy, inner.gather(1, idx)


def _feature_rows(maps: Tensor) -> Tensor:
    """(B, C, H, W) -> (B * H * W, C); a free view for channels-last maps."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _flat_index(xy: Tensor, height: int, width: int) -> Tensor:
    """Row indices into :func:`_feature_rows` of integer positions ``xy`` (B, ..., 2)."""
    bsz = xy.shape[0]
    batch = torch.arange(bsz, device=xy.device).view(bsz, *([1] * (xy.dim() - 2)))
    return (batch * height + xy[..., 1]) * width + xy[..., 0]


def _gather(rows: Tensor, xy: Tensor, height: int, width: int) -> Tensor:
    """Feature rows at integer positions ``xy`` (B, ..., 2) -> (B, ..., C)."""
    flat = _flat_index(xy, height, width)
    return rows.index_select(0, flat.reshape(-1)).view(*flat.shape, rows.shape[1])


class _SoftHistogram(torch.autograd.Function):
    """Triangular-kernel histogram of similarities over ``nq`` bins, 1 (bin 0) down to 0.

    Each score in [0, 1] splits its weight linearly between its two nearest bin centres;
    scores above 1 go to bin 0, below 0 to the last bin: the official quantiser exactly,
    as two scatters instead of an (N, nq, M) tensor. The backward pass recomputes the bins
    from the scores instead of storing them.
    """

    @staticmethod
    def _bins(scores: Tensor, nq: int) -> tuple[Tensor, Tensor]:
        t = ((1 - scores) * (nq - 1)).clamp_(0, nq - 1)
        # a NaN score (a diverged network) gets a valid bin and a NaN weight, so the loss turns
        # NaN and the trainer's non-finite check sees it, instead of an out-of-range index
        lo = t.nan_to_num(0.0).floor_().clamp_(max=nq - 2)
        return lo.long(), t.sub_(lo)  # bin below, weight of the bin above

    @staticmethod
    def forward(ctx, scores: Tensor, weights: Tensor | None, nq: int) -> Tensor:
        lo, hi_w = _SoftHistogram._bins(scores, nq)
        lo_w = 1 - hi_w
        if weights is not None:
            hi_w.mul_(weights)
            lo_w.mul_(weights)
        ctx.save_for_backward(scores, weights)
        ctx.nq = nq
        hist = scores.new_zeros(scores.shape[0], nq)
        return hist.scatter_add_(1, lo, lo_w).scatter_add_(1, lo + 1, hi_w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        scores, weights = ctx.saved_tensors
        nq = ctx.nq
        lo, _ = _SoftHistogram._bins(scores, nq)
        # d(count of bin lo) / d score = (nq - 1) w; d(count of bin lo + 1) / d score = -(nq - 1) w
        step = (grad[:, :-1] - grad[:, 1:]).mul_(nq - 1)
        out = step.gather(1, lo)
        out.mul_(((scores > 0) & (scores < 1)).to(out.dtype))
        if weights is not None:
            out.mul_(weights)
        return out, None, None


def negative_histogram(negatives: Tensor, weights: Tensor | None = None, nq: int = 20) -> Tensor:
    """Soft counts (N, nq) of negative similarities (N, M), weighted (N, M) in [0, 1] or not.

    Histograms of several blocks of negatives add up, so the blocks need not be concatenated.
    """
    return _SoftHistogram.apply(
        negatives.float(), None if weights is None else weights.float().detach(), nq
    )


def quantized_ap(positives: Tensor, negative_counts: Tensor, nq: int = 20) -> Tensor:
    """Differentiable average precision by quantisation (the official ``APLoss``).

    Args:
        positives: (N, P) similarities of each query to its positives.
        negative_counts: (N, nq) soft counts of its negatives (:func:`negative_histogram`).
        nq: number of quantisation bins over [0, 1] (bin 0 is similarity 1).

    Returns:
        (N,) AP per query in [0, 1].
    """
    rec = _SoftHistogram.apply(positives.float(), None, nq)
    prec = rec.cumsum(1) / ((rec + negative_counts).cumsum(1) + 1e-16)
    rec = rec / rec.sum(1, keepdim=True).clamp_min(1e-16)
    return (prec * rec).sum(1)


def reliability_ap_loss(
    desc_a: Tensor,
    desc_b: Tensor,
    rel_a: Tensor,
    rel_b: Tensor,
    flow: Tensor,
    valid: Tensor,
    pos_offsets: Tensor,
    neg_offsets: Tensor,
    *,
    subq: int = -8,
    neg_d: int = 5,
    border: int = 16,
    subd_neg: int = -8,
    maxpool_pos: bool = True,
    nq: int = 20,
    base: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Reliability-weighted AP loss with the official ``NghSampler2`` sampling.

    For each query pixel of A: its positives are B's pixels within ``pos_d`` of the ground
    truth (the best one kept when ``maxpool_pos``), its negatives B's pixels on the ring
    ``neg_d``..``ngh`` plus random distractors from every image B of the batch (those within
    ``neg_d`` of the ground truth excluded). Per query ``1 - AP * r - (1 - r) * base`` with
    ``r`` the reliability (mean of A's at the query and B's at the best positive).

    Args:
        desc_a, desc_b: (B, C, H, W) L2-normalised descriptors (channels-last is fastest).
        rel_a, rel_b: (B, 1, H, W) reliability.
        flow: (B, H, W, 2) absolute flow A -> B; valid: (B, H, W) bool.
        pos_offsets, neg_offsets: (P, 2), (K, 2) from :func:`neighbourhood_offsets`, on the
            device (built once, so the loss needs no host-to-device copy).

    Returns:
        ``loss`` (scalar: mean over queries with a ground truth, 0 when there are none) and
        ``ap`` (scalar, detached: their mean AP, for logging).
    """
    bsz, chan, height, width = desc_a.shape
    rows_a, rows_b = _feature_rows(desc_a), _feature_rows(desc_b)
    rel_rows_a, rel_rows_b = _feature_rows(rel_a), _feature_rows(rel_b)

    xy_q, ok = sample_positions(valid, border, subq)  # (B, n, 2)
    batch = torch.arange(bsz, device=flow.device)[:, None]
    target = flow[batch, xy_q[..., 1], xy_q[..., 0]]  # (B, n, 2)
    target = torch.where(ok[..., None], target, torch.zeros_like(target))
    gt = (target + 0.5).floor().long()
    feat_q = _gather(rows_a, xy_q, height, width)  # (B, n, C)
    conf = _gather(rel_rows_a, xy_q, height, width)[..., 0]

    npos, nq_total = pos_offsets.shape[0], bsz * xy_q.shape[1]
    cand = gt[:, :, None, :] + torch.cat([pos_offsets, neg_offsets])  # (B, n, P + K, 2)
    cx, cy = cand.unbind(-1)
    inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    cand = torch.stack([cx.clamp(0, width - 1), cy.clamp(0, height - 1)], dim=-1)
    if subd_neg != 0:  # distractors anywhere in images B
        xy_d, _ = sample_positions(torch.ones_like(valid), border, subd_neg)  # (B, m, 2)
    else:
        xy_d = cand.new_zeros(bsz, 0, 2)
    # one gather from B for neighbourhoods and distractors: one full-size gradient buffer
    index_ngh, index_d = _flat_index(cand, height, width), _flat_index(xy_d, height, width)
    feat_b = rows_b.index_select(0, torch.cat([index_ngh.reshape(-1), index_d.reshape(-1)]))
    feat_ngh, feat_d = feat_b.split([index_ngh.numel(), index_d.numel()])
    scores = (feat_ngh.view(nq_total, -1, chan) @ feat_q.reshape(nq_total, chan, 1))[..., 0].float()
    pos_scores, neg_scores = scores[:, :npos], scores[:, npos:]
    counts = negative_histogram(neg_scores, inside[..., npos:].reshape(nq_total, -1), nq)
    if maxpool_pos:
        pos_scores, best = pos_scores.max(dim=1, keepdim=True)
        best_xy = cand.reshape(nq_total, -1, 2)[
            torch.arange(nq_total, device=flow.device), best[:, 0]
        ]
        rel_best = rel_rows_b.index_select(
            0, _flat_index(best_xy.view(bsz, -1, 2), height, width).reshape(-1)
        )
        conf = (conf + rel_best.view(bsz, -1)) / 2
    dist = (feat_q.reshape(nq_total, chan) @ feat_d.t()).float()  # (B n, B m)
    # distractors of the query's own image B within neg_d of its ground truth are dropped
    near = ((xy_d[:, None] - gt[:, :, None]) ** 2).sum(-1) < neg_d**2  # (B, n, m)
    own = torch.eye(bsz, dtype=torch.bool, device=flow.device)[:, None, :, None]
    keep = ~(own & near[:, :, None, :])  # (B, n, B, m)
    counts = counts + negative_histogram(dist, keep.reshape(nq_total, -1), nq)

    ap = quantized_ap(pos_scores, counts, nq)
    conf = conf.reshape(-1).float()
    per_query = 1 - ap * conf - (1 - conf) * base
    mask = ok.reshape(-1).float()
    count = mask.sum().clamp_min(1)
    return (per_query * mask).sum() / count, ((ap * mask).sum() / count).detach()


def _normalised_grid(flow: Tensor, valid: Tensor) -> Tensor:
    """Absolute flow (B, H, W, 2) in pixels -> ``grid_sample`` grid (align_corners=True)."""
    height, width = flow.shape[1:3]
    fx, fy = flow.unbind(-1)
    grid = torch.stack([fx * (2 / max(width - 1, 1)) - 1, fy * (2 / max(height - 1, 1)) - 1], -1)
    return torch.where(valid[..., None], grid, torch.full_like(grid, -2.0))


def cosim_loss(
    rep_a: Tensor, rep_b: Tensor, flow: Tensor, valid: Tensor, patch: int = 16
) -> Tensor:
    """``1 - cos`` between ``patch x patch`` windows of A's repeatability and B's warped onto A.

    Windows overlap by half (stride ``patch // 2``); invalid pixels are zeroed in both maps
    and each window is weighted by its valid fraction.

    Args:
        rep_a, rep_b: (B, 1, H, W) repeatability; flow: (B, H, W, 2); valid: (B, H, W) bool.

    Returns:
        Scalar; 0 when no pixel is valid.
    """
    m = valid[:, None].to(rep_a.dtype)
    warped = F.grid_sample(
        rep_b,
        _normalised_grid(flow, valid).to(rep_b.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    a, b = rep_a * m, warped * m

    def pool(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, patch, stride=patch // 2)

    weight = pool(m)
    cos = pool(a * b) * torch.rsqrt((pool(a * a) + 1e-12) * (pool(b * b) + 1e-12))
    return ((1 - cos) * weight).sum() / weight.sum().clamp_min(1e-12)


def peaky_loss(rep: Tensor, patch: int = 16) -> Tensor:
    """``1 - mean(local max - local mean)`` of the (3x3-smoothed) repeatability, per image.

    Args:
        rep: (B, 1, H, W).

    Returns:
        (B,) loss per image; the ``(patch + 1)`` windows are applied separably (same values).
    """
    s = F.avg_pool2d(rep, 3, stride=1, padding=1)
    k, p = patch + 1, patch // 2
    local_max = F.max_pool2d(F.max_pool2d(s, (1, k), 1, (0, p)), (k, 1), 1, (p, 0))
    local_mean = F.avg_pool2d(F.avg_pool2d(s, (1, k), 1, (0, p)), (k, 1), 1, (p, 0))
    return 1 - (local_max - local_mean).mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- extraction


def pyramid_sizes(
    height: int,
    width: int,
    scale_f: float = 2**0.25,
    min_size: int = 256,
    max_size: int = 1024,
    min_scale: float = 0.0,
    max_scale: float = 1.0,
) -> list[tuple[int, int, bool]]:
    """The official multi-scale loop: every resize step ``(h, w, extract_here)``.

    The image is resized step by step (each from the previous one, as officially) by
    ``1 / scale_f``, from scale 1 while ``scale >= max(min_scale, min_size / max(H, W))``;
    features are extracted at the steps with ``scale <= min(max_scale, max_size / max(H,
    W))``. An image below ``min_size`` still gets scale 1 (the official loop yields nothing).
    """
    longest = max(height, width)
    lo, hi = max(min_scale, min_size / longest), min(max_scale, max_size / longest)
    steps, s = [], 1.0
    while s + 0.001 >= lo:
        size = (height, width) if s == 1.0 else (round(height * s), round(width * s))
        steps.append((*size, s - 0.001 <= hi))
        s /= scale_f
    if not any(use for *_, use in steps):
        steps = [(height, width, True)]
    return steps


def _positive_int(doc: str, default: int) -> Param:
    return Param(default, doc, lambda v: v > 0, "a positive integer")


def _non_negative(doc: str, default: float) -> Param:
    return Param(default, doc, lambda v: v >= 0, "a non-negative number")


def _unit(doc: str, default: float) -> Param:
    return Param(default, doc, lambda v: 0 <= v <= 1, "a number in [0, 1]")


class R2D2(Method):
    """R2D2 with the official ``Quad_L2Net_ConfCFS`` (or ``Fast_Quad_L2Net_ConfCFS``) network.

    Parameters: :attr:`default_params` (each with its comment). The extraction thresholds
    are 0 by default: keypoints are the top K local maxima by score, as the evaluation
    protocol defines them; the official extractor's 0.7 / 0.7 would leave fewer than 2048
    keypoints on RoadScene's thermal images, and fine-tuning shifts the score scale those
    values were set for. ``low_memory`` gives the same values and gradients with about 20 %
    less peak memory, but is 20-60 % slower on CPU (benchmarks/README.md).
    """

    name = "r2d2"
    label = "R2D2"
    default_crop = 192
    default_lr = 1e-4
    default_weight_decay = 5e-4
    extract_options: ClassVar[dict[str, Any]] = {"multiscale": False}
    default_params: ClassVar[dict[str, Any]] = {
        "dim": _positive_int("descriptor size (official: 128)", 128),
        "mchan": _positive_int("channel multiplier of the trunk (official: 4, 6 for N8_big)", 4),
        "relu22": Param(False, "ReLU after the 2x2 convolutions (official: false)"),
        "downsample_factor": Param(
            1,
            "1: Quad_L2Net, the full-resolution trunk; a power of two >= 2: Fast_Quad_L2Net "
            "(official faster2d2: 2), the trunk after the third convolution at 1 / factor of the "
            "resolution, upsampled back (extraction 2.5-3x faster on a 2-core CPU)",
            lambda v: v >= 1 and v & (v - 1) == 0,
            "1 (Quad_L2Net) or a power of two >= 2 (Fast_Quad_L2Net)",
        ),
        "patch_size": Param(
            16, "N of the cosim and peaky losses", lambda v: v >= 2 and v % 2 == 0,
            "an even integer >= 2",
        ),
        "ap_nq": Param(20, "AP quantisation bins", lambda v: 2 <= v <= 100, "an integer in [2, 100]"),
        "ap_base": Param(
            0.5, "base AP of the reliability loss", lambda v: 0 <= v < 1, "a number in [0, 1)"
        ),
        "ngh": _positive_int("AP sampler: radius of the neighbourhood of B searched (px)", 7),
        "subq": Param(
            -8, "AP sampler: query grid step (< 0: random queries, that mean spacing)",
            lambda v: v != 0, "a non-zero integer (< 0: random queries)",
        ),
        "subd": _positive_int("AP sampler: step of the neighbourhood grid (px)", 1),
        "pos_d": Param(3, "AP sampler: radius of the positives (px)", lambda v: v >= 0,
                       "a non-negative integer"),
        "neg_d": Param(5, "AP sampler: inner radius of the negative ring (px)"),
        "border": Param(16, "AP sampler: border left out of the queries (px)", lambda v: v >= 0,
                        "a non-negative integer"),
        "subd_neg": Param(-8, "AP sampler: distractor grid step (0: none, < 0: random)"),
        "maxpool_pos": Param(True, "AP sampler: keep only the best positive (official NghSampler2)"),
        "w_ap": _non_negative("weight of the reliability AP loss", 1.0),
        "w_cosim": _non_negative("weight of the cosine-similarity repeatability loss", 1.0),
        "w_peaky": _non_negative("weight of the peakiness loss", 1.0),
        "reliability_thr": _unit("extraction: least reliability of a keypoint (official: 0.7)", 0.0),
        "repeatability_thr": _unit("extraction: least repeatability of a keypoint (official: 0.7)", 0.0),
        "scale_f": Param(2**0.25, "multi-scale pyramid: scale ratio of two levels",
                         lambda v: v > 1, "a number > 1"),
        "min_size": _positive_int("multi-scale pyramid: smallest image side (px)", 256),
        "max_size": _positive_int("multi-scale pyramid: largest image side (px)", 1024),
        "min_scale": Param(0.0, "multi-scale pyramid: smallest scale", lambda v: v >= 0,
                           "a number in [0, max_scale]"),
        "max_scale": Param(1.0, "multi-scale pyramid: largest scale", lambda v: 0 < v <= 1,
                           "a number in (0, 1]"),
        "low_memory": Param(
            False,
            "training: keep one activation per trunk stage for the backward (batch norm saves "
            "its output, the ReLU is recomputed in the next convolution's backward)",
        ),
    }

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """The AP sampler's radii (``pos_d < neg_d <= ngh``, ``subd <= ngh``) and the
        pyramid's scales (``min_scale <= max_scale``)."""
        p = params
        cls.require(p["pos_d"] < p["neg_d"] <= p["ngh"], p, "neg_d", "an integer with pos_d < neg_d <= ngh")
        cls.require(p["subd"] <= p["ngh"], p, "subd", "an integer <= ngh")
        cls.require(p["min_scale"] <= p["max_scale"], p, "min_scale", "a number in [0, max_scale]")

    def _init(self) -> None:
        p = self.params
        self.ops, self._stages = _build_trunk(
            p["dim"], p["mchan"], p["relu22"], p["downsample_factor"]
        )
        self.clf = nn.Conv2d(p["dim"], 2, kernel_size=1)
        self.sal = nn.Conv2d(p["dim"], 1, kernel_size=1)
        pos, neg = neighbourhood_offsets(p["ngh"], p["subd"], p["pos_d"], p["neg_d"])
        self.register_buffer("_pos_offsets", pos, persistent=False)
        self.register_buffer("_neg_offsets", neg, persistent=False)
        self.register_buffer(
            "_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.to(memory_format=torch.channels_last)


    # -- network ----------------------------------------------------------------------------

    def _trunk(self, x: Tensor) -> Tensor:
        """Raw (unnormalised) 128-d features at the input's size; eval mode folds batch norm
        into the convs."""
        if self.params["low_memory"] and self.training and torch.is_grad_enabled():
            return self._trunk_lean(x)
        size = x.shape[-2:]
        for conv_at, bn_at, relu, pool in self._stages:
            conv = self.ops[conv_at]
            if bn_at is None:
                x = conv(x)
            elif self.training:
                x = self.ops[bn_at](conv(x))
            else:
                weight, bias = _fold_bn(conv, self.ops[bn_at])
                x = F.conv2d(x, weight, bias, 1, conv.padding, conv.dilation)
            if relu:
                x = F.relu(x, inplace=True)
            if pool > 1:
                x = F.max_pool2d(x, pool)
        return _to_input_size(x, size)

    def _trunk_lean(self, x: Tensor) -> Tensor:
        """The training trunk, keeping one activation per stage for backward (same values).

        A max-pool runs before the pending ReLU (they commute), so that ReLU still fuses into
        the next convolution; the pool's indices and the pooled map kept by that convolution
        come on top, each ``1 / downsample_factor**2`` the size of the stage's activation.
        """
        size = x.shape[-2:]
        relu_pending = False  # the previous stage's ReLU, fused into this convolution
        for conv_at, bn_at, relu, pool in self._stages:
            conv = self.ops[conv_at]
            if relu_pending:
                x = _ReluConv.apply(x, conv.weight, conv.bias, conv.padding, conv.dilation)
            else:
                x = conv(x)
            if bn_at is not None:
                x = _BatchNormKeepOutput.apply(x, self.ops[bn_at])
            elif relu:
                x = F.relu(x)
            relu_pending = relu and bn_at is not None
            if pool > 1:
                x = F.max_pool2d(x, pool)
        if relu_pending:
            x = F.relu(x)
        return _to_input_size(x, size)

    def _forward(self, images: Tensor) -> DenseFeatures:
        """Dense R2D2 features.

        Args:
            images: (B, 3, H, W) RGB in [0, 1]; ImageNet normalisation happens here.

        Returns:
            :class:`DenseFeatures` at stride 1: descriptors (B, dim, H, W) L2-normalised,
            scores = repeatability * reliability (B, 1, H, W), extras ``repeatability`` and
            ``reliability`` (B, 1, H, W) in [0, 1]. Maps are channels-last in memory.
        """
        x = ((images - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
        x = self._trunk(x)
        sq = x.square()
        reliability = F.softmax(self.clf(sq), dim=1)[:, 1:2]
        u = F.softplus(self.sal(sq))
        repeatability = u / (1 + u)
        return DenseFeatures(
            descriptors=F.normalize(x, dim=1),
            scores=repeatability * reliability,
            extras={"repeatability": repeatability, "reliability": reliability},
            stride=1,
        )

    # -- checkpoints ------------------------------------------------------------------------

    def load_state_checked(self, state_dict: dict[str, Tensor], source: str) -> None:
        """Strictly load a state dict, naming ``source`` and every mismatch on failure.

        Raises:
            CheckpointError: missing or unexpected keys, non-tensors, or wrong shapes.
        """
        expected = self.state_dict()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        wrong = [
            f"{k} (file {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, "
            f"model {tuple(expected[k].shape)})"
            for k, v in state_dict.items()
            if k in expected and (not isinstance(v, Tensor) or v.shape != expected[k].shape)
        ]
        problems = [
            f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("wrong shapes", wrong),
            )
            if items
        ]
        if problems:
            raise CheckpointError(
                f"{source}: weights do not fit the R2D2 network ({'; '.join(problems)})"
            )
        self.load_state_dict(state_dict, strict=True)

    def load_pretrained(self, path: str | Path) -> None:
        """Initialise from an official R2D2 checkpoint (e.g. ``r2d2_WASF_N16.pt``).

        Raises:
            CheckpointError: unreadable file, non-whitelisted or different architecture,
                missing/unexpected keys or wrong shapes (the message names the file).
        """
        arch, state = read_official_checkpoint(path)
        differ = {k: v for k, v in arch.items() if self.params[k] != v}
        if differ:
            mine = {k: self.params[k] for k in differ}
            raise CheckpointError(
                f"{path}: checkpoint architecture {differ} differs from this network's {mine}"
            )
        self.load_state_checked(state, str(path))

    @classmethod
    def pretrained_params(cls, path: str) -> dict[str, Any]:
        """The architecture of an official checkpoint (``mchan``, ``downsample_factor``...)."""
        return read_official_checkpoint(path)[0]

    @classmethod
    def recognizes(cls, obj: Any) -> bool:
        """The official format: ``{"net": str, "state_dict": {...}}``."""
        return is_official_checkpoint(obj)

    @classmethod
    def from_pretrained(cls, path: str | Path, **params: Any) -> R2D2:
        """Build the network an official checkpoint describes and load its weights (the
        file is read once).

        Args:
            path: official checkpoint file.
            params: other hyperparameters (loss, extraction thresholds...); the file's
                architecture wins over architecture parameters given here.
        """
        arch, state = read_official_checkpoint(path)
        net = cls(**{**params, **arch})
        net.load_state_checked(state, str(path))
        return net

    #: the name the official-checkpoint loader had before the method template
    from_official_checkpoint = from_pretrained

    # -- loss -------------------------------------------------------------------------------

    def _loss(
        self, out_a: DenseFeatures, out_b: DenseFeatures, flow: Tensor, valid: Tensor
    ) -> dict[str, Tensor]:
        """The official ``MultiLoss``: AP reliability + cosim + peaky.

        Args:
            out_a, out_b: this network's outputs for images A and B (B, ..., H, W).
            flow: (B, H, W, 2) absolute flow A -> B; valid: (B, H, W) bool.

        Returns:
            ``total``, ``ap`` (reliability AP loss), ``cosim``, ``peaky`` (weighted into
            ``total`` by w_ap, w_cosim, w_peaky) and ``mean_ap`` (detached, for logging).
            Pairs with no valid pixel contribute nothing.
        """
        p = self.params
        bsz, _, height, width = out_a.descriptors.shape
        # the maps are at the input's resolution: the ground truth must be at theirs
        check_shape(flow, "B,H,W,2", "flow", self.name, B=bsz, H=height, W=width)
        valid, flow = valid.bool(), flow.float()
        # the small maps in float32 (under autocast they come in bf16, too coarse for flows)
        rep_a, rep_b = out_a.extras["repeatability"].float(), out_b.extras["repeatability"].float()
        ap, mean_ap = reliability_ap_loss(
            out_a.descriptors,
            out_b.descriptors,
            out_a.extras["reliability"].float(),
            out_b.extras["reliability"].float(),
            flow,
            valid,
            self._pos_offsets,
            self._neg_offsets,
            subq=p["subq"],
            neg_d=p["neg_d"],
            border=p["border"],
            subd_neg=p["subd_neg"],
            maxpool_pos=p["maxpool_pos"],
            nq=p["ap_nq"],
            base=p["ap_base"],
        )
        cosim = cosim_loss(rep_a, rep_b, flow, valid, p["patch_size"])
        paired = valid.flatten(1).any(1).to(rep_a.dtype)
        peaky_ab = (peaky_loss(rep_a, p["patch_size"]) + peaky_loss(rep_b, p["patch_size"])) / 2
        peaky = (peaky_ab * paired).sum() / paired.sum().clamp_min(1)
        total = p["w_ap"] * ap + p["w_cosim"] * cosim + p["w_peaky"] * peaky
        return {"total": total, "ap": ap, "cosim": cosim, "peaky": peaky, "mean_ap": mean_ap}

    # -- extraction -------------------------------------------------------------------------

    def _detect(self, image: Tensor, max_keypoints: int) -> tuple[Tensor, Tensor, Tensor]:
        """Single-scale detections of one image (1, 3, h, w): xy (N, 2), scores, descriptors."""
        out = self(image)
        rep, rel = out.extras["repeatability"][0, 0], out.extras["reliability"][0, 0]
        peak = rep == F.max_pool2d(rep[None, None], 3, stride=1, padding=1)[0, 0]
        keep = (
            peak
            & (rep >= self.params["repeatability_thr"])
            & (rel >= self.params["reliability_thr"])
        )
        score = torch.where(keep, rep * rel, torch.full_like(rep, -1.0)).reshape(-1)
        top, idx = score.topk(min(max_keypoints, score.numel()))
        idx = idx[top >= 0]
        width = rep.shape[1]
        xy = torch.stack([idx % width, idx // width], dim=1).float()
        desc = _feature_rows(out.descriptors).index_select(0, idx)
        return xy, score[idx], desc

    def _extract(self, image: Tensor, max_keypoints: int, multiscale: bool = False) -> Features:
        """Keypoints of one image, the official way (NMS + thresholds, score rep * rel).

        Args:
            image: (1, 3, H, W) RGB in [0, 1] on this network's device.
            max_keypoints: K, the most keypoints returned.
            multiscale: use the official pyramid (``scale_f``, ``min_size``, ``max_size``,
                ``min_scale``, ``max_scale``) and keep the top K over all scales.

        Returns:
            :class:`~s2study.features.Features` sorted by decreasing score: keypoints (N, 2)
            in the input's pixel coordinates, scores (N,), descriptors (N, dim)
            L2-normalised; N <= K.
        """
        height, width = image.shape[2:]
        p = self.params
        steps = (
            pyramid_sizes(
                height,
                width,
                p["scale_f"],
                p["min_size"],
                p["max_size"],
                p["min_scale"],
                p["max_scale"],
            )
            if multiscale
            else [(height, width, True)]
        )
        found, current = [], image
        for h, w, use in steps:
            if (h, w) != tuple(current.shape[2:]):
                current = F.interpolate(current, (h, w), mode="bilinear", align_corners=False)
            if use:
                xy, scores, desc = self._detect(current, max_keypoints)
                scale = xy.new_tensor([width / w, height / h])
                found.append(((xy + 0.5) * scale - 0.5, scores, desc))
        xy, scores, desc = (torch.cat(parts) for parts in zip(*found))
        order = scores.topk(min(max_keypoints, scores.numel())).indices
        return Features(xy[order], scores[order], desc[order])
