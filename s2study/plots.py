"""Figures: CMR / NCM curves over the pixel threshold, and drawn matches.

Matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend
change), so plotting works headless and inside Ray workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from s2study.evaluate import EvalResult

_LABELS = {"cmr": "CMR (%)", "ncm": "NCM (matches)"}

GREEN, RED, YELLOW = (0, 200, 0), (230, 0, 0), (240, 200, 0)  # RGB


def plot_curves(result: EvalResult, metric: str, path: Path, ks: list[int] | None = None) -> Path:
    """Mean CMR or NCM as a function of the pixel threshold: one panel per K, one line per method.

    Args:
        result: an evaluation result.
        metric: ``"cmr"`` or ``"ncm"``.
        path: PNG file to write.
        ks: the K values to show (default: all of ``result.ks``).

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in _LABELS:
        raise ValueError(f"metric must be one of {sorted(_LABELS)}, got {metric!r}")
    ks = list(ks or result.ks)
    fig = Figure(figsize=(4.2 * len(ks), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ks), squeeze=False, sharey=True)[0]
    for ax, k in zip(axes, ks):
        for method in result.methods:
            means = result.means[method][k]
            curve = means.cmr_curve if metric == "cmr" else means.ncm_curve
            ax.plot(means.thresholds, curve, marker="o", markersize=3, label=method)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("threshold (px)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(_LABELS[metric])
    axes[-1].legend(fontsize="small")
    fig.suptitle(
        f"{metric.upper()} curve, {result.dataset} {result.split} ({len(result.pair_ids)} pairs)"
    )
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_lambda_curves(
    curves: dict[str, dict[int, list[tuple[float, float, float | None]]]], path: str | Path, title: str
) -> Path:
    """NCM against lambda, one panel per series (method and dataset), one line per K (Fig. 3);
    error bars of one sample standard deviation where a lambda has several runs.

    Args:
        curves: :func:`s2study.report.lambda_curves` output.
        path: PNG file to write.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * len(curves), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, by_k) in zip(axes, curves.items()):
        for k, points in by_k.items():
            lams, means, stds = zip(*points)
            errors = [s or 0.0 for s in stds] if any(s is not None for s in stds) else None
            ax.errorbar(lams, means, yerr=errors, marker="o", markersize=4, capsize=3, label=f"K = {k}")
        ax.set_title(name)
        ax.set_xlabel("lambda (SSL weight)")
        ax.set_ylabel(_LABELS["ncm"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def plot_pareto_front(points: list[tuple[float, float]], front: list[int], labels: tuple[str, str],
                      path: str | Path, title: str) -> Path:
    """Every trial in the plane of two objectives (grey), the Pareto front in red, joined in
    order of the first objective."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter(*zip(*points), s=18, color="0.6", label="trials")
    on = sorted(points[i] for i in front)
    ax.plot(*zip(*on), marker="o", color="tab:red", label="Pareto front")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return _save(fig, path)


def draw_matches(
    image_a: np.ndarray,
    image_b: np.ndarray,
    kp_a: np.ndarray,
    kp_b: np.ndarray,
    matches: np.ndarray,
    correct_mask: np.ndarray | None,
    path: Path | None,
    known_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Draw matches side by side: correct green, wrong red, unknown yellow.

    Args:
        image_a, image_b: uint8 RGB (H, W, 3) or gray (H, W) images.
        kp_a: (N, 2) and kp_b: (M, 2) keypoints ``(x, y)``.
        matches: (K, 2) index pairs into ``kp_a`` and ``kp_b``.
        correct_mask: (K,) bool, or None when there is no ground truth (all yellow).
        path: PNG/JPEG file to write, or None.
        known_mask: (K,) bool, False where the ground truth of a match is unknown (yellow).

    Returns:
        The drawing, (max(H_a, H_b), W_a + W_b, 3) uint8 RGB.
    """
    a, b = (
        np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im for im in (image_a, image_b)
    )
    height = max(a.shape[0], b.shape[0])
    canvas = np.zeros((height, a.shape[1] + b.shape[1], 3), dtype=np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] :] = b
    matches = np.asarray(matches, dtype=np.int64).reshape(-1, 2)
    n = len(matches)
    correct = np.zeros(n, bool) if correct_mask is None else np.asarray(correct_mask, bool)
    known = (
        np.full(n, correct_mask is not None) if known_mask is None else np.asarray(known_mask, bool)
    )
    offset = np.array([a.shape[1], 0.0])
    # wrong first, then unknown, then correct, so correct matches stay visible on top
    rank = np.where(known & correct, 2, np.where(known, 0, 1))
    colors = (RED, YELLOW, GREEN)
    for i in np.argsort(rank, kind="stable"):
        color = colors[rank[i]]
        pa = tuple(round(v) for v in kp_a[matches[i, 0]])
        pb = tuple(round(v) for v in np.asarray(kp_b[matches[i, 1]]) + offset)
        cv2.line(canvas, pa, pb, color, 1, cv2.LINE_AA)
        cv2.circle(canvas, pa, 2, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, pb, 2, color, -1, cv2.LINE_AA)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
            from s2study.errors import EnvironmentProblem

            raise EnvironmentProblem(
                f"cannot write {path} (unsupported extension or unwritable folder)"
            )
    return canvas
