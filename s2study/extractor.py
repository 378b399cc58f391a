"""``load_extractor``: one call from a checkpoint, the official R2D2 file or a baseline name
to an :class:`~s2study.features.Extractor` (design.md section 4).

What ``checkpoint`` may be, tried in this order:

1. an existing file: an s2study checkpoint (:mod:`s2study.checkpoint`; the network is rebuilt
   from the method name and hyperparameters it stores, and its weights load strictly), or the
   official R2D2 checkpoint (a dict with ``net`` and ``state_dict``; its ``net`` string is
   parsed against R2D2's whitelist, never evaluated);
2. a weights name (``official``, ``r2d2_WASF_N16``, ``faster2d2_WASF_N16``, ...), resolved to
   the official file by :mod:`s2study.resolver` (fetched into the cache on first use);
3. the name of a baseline registered in :data:`s2study.baselines.BASELINES` (``sift``,
   ``rift``; ``cmm-net`` is reserved and explains why it cannot run).

Every extractor takes a uint8 image, HxW (gray, replicated to RGB) or HxWx3 (RGB), and returns
:class:`~s2study.features.Features` in the input's pixel coordinates, sorted by decreasing
score, at most ``max_keypoints`` of them, with float32 L2-normalised descriptors. It carries a
``name`` for tables and a ``cache_key`` naming its weights and settings.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2study.errors import CheckpointError, ConfigError, DataError, EnvironmentProblem
from s2study.features import Extractor, Features
from s2study.methods.base import Method


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Check an input image and return it as (H, W, 3) uint8 RGB (gray replicated).

    Raises:
        DataError: not a uint8 HxW, HxWx1 or HxWx3 array.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"expected a uint8 numpy image, got {kind}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise DataError(f"expected an HxW or HxWx3 image, got shape {image.shape}")


def finalize_features(
    keypoints: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor,
    descriptors: np.ndarray | torch.Tensor,
    max_keypoints: int,
) -> Features:
    """Features in the interface's form: sorted by decreasing score (stable), at most
    ``max_keypoints``, float32, descriptors L2-normalised.

    Args:
        keypoints: (N, 2) ``(x, y)``; scores: (N,); descriptors: (N, D).
    """
    xy, sc, desc = (
        (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(
            np.float32, copy=False
        )
        for v in (keypoints, scores, descriptors)
    )
    order = np.argsort(-sc, kind="stable")[:max_keypoints]
    desc = desc[order]
    norms = np.linalg.norm(desc, axis=1, keepdims=True)
    desc = desc / np.maximum(norms, 1e-12)
    return Features(
        np.ascontiguousarray(xy[order].reshape(-1, 2)),
        np.ascontiguousarray(sc[order]),
        np.ascontiguousarray(desc, dtype=np.float32),
    )


def check_max_keypoints(max_keypoints: int) -> int:
    """Return ``max_keypoints`` if it is a positive int, else raise :class:`ConfigError`."""
    if (
        isinstance(max_keypoints, bool)
        or not isinstance(max_keypoints, (int, np.integer))
        or max_keypoints <= 0
    ):
        raise ConfigError(f"max_keypoints (K) must be a positive integer, got {max_keypoints!r}")
    return int(max_keypoints)


class MethodExtractor:
    """A :class:`~s2study.methods.base.Method` in eval mode behind the extractor interface.

    Args:
        method: the network (moved to ``device`` and put in eval mode here).
        name: row label in tables.
        cache_key: identifies the weights and the settings.
        device: torch device the network runs on.
        options: keyword options of ``method.extract`` (e.g. ``multiscale=True``).
    """

    def __init__(
        self,
        method: Method,
        name: str,
        cache_key: str,
        device: torch.device,
        options: dict[str, Any],
    ) -> None:
        self.method = method.to(device).eval()
        self.name = name
        self.cache_key = cache_key
        self.device = device
        self.options = options

    def __call__(self, image: np.ndarray, max_keypoints: int = 4096) -> Features:
        """image: uint8 HxW or HxWx3 RGB. Returns at most ``max_keypoints`` features."""
        k = check_max_keypoints(max_keypoints)
        rgb = as_rgb_uint8(image)
        tensor = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device)
        tensor = tensor.permute(2, 0, 1)[None].float().div_(255.0)
        self.method.eval()
        with torch.no_grad():
            kp = self.method.extract(tensor, k, **self.options)
        return finalize_features(kp.xy, kp.scores, kp.descriptors, k)

    def __repr__(self) -> str:
        return f"MethodExtractor(name={self.name!r}, device={self.device}, options={self.options})"


def extract_features(
    extractor: Extractor, image: np.ndarray | str | Path, k: int = 4096
) -> Features:
    """Run ``extractor`` on an image array or an image file, keeping at most ``k`` features.

    Args:
        extractor: from :func:`load_extractor`.
        image: uint8 HxW / HxWx3 RGB array, or a path (read as RGB).
        k: maximum number of keypoints.

    Returns:
        :class:`~s2study.features.Features` sorted by score.
    """
    if isinstance(image, (str, Path)):
        from s2study.data.datasets import read_image

        image = read_image(Path(image))
    return extractor(image, max_keypoints=check_max_keypoints(k))


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device; ``auto`` picks CUDA when present.

    Raises:
        EnvironmentProblem: CUDA requested but not available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem(
            f"device {device!r} requested but CUDA is not available here; use --device cpu"
        )
    return dev


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (weights digest, method, options...)."""
    from s2study import __version__

    text = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _check_extract_options(method: Method, options: dict[str, Any]) -> None:
    accepted = [
        p.name
        for p in inspect.signature(method.extract).parameters.values()
        if p.kind is p.KEYWORD_ONLY
        or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("image", "max_keypoints"))
    ]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ConfigError(
            f"method {method.name!r} does not take the extraction option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or '(none)'}"
        )


def _load_raw(path: Path) -> Any:
    from s2study.checkpoint import safe_torch_load

    return safe_torch_load(path, "checkpoint")


def _method_from_file(path: Path) -> tuple[Method, str]:
    """Rebuild the network stored in ``path``; returns it and its default table name."""
    from s2study.checkpoint import load_checkpoint
    from s2study.methods import build_method

    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as not_ours:
        from s2study.methods.r2d2 import R2D2, is_official_checkpoint

        if not is_official_checkpoint(_load_raw(path)):
            raise not_ours from None
        return R2D2.from_official_checkpoint(path), path.stem
    spec = ckpt["method"]
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(f"{path}: the 'method' entry must be a dict with 'name' and 'params'")
    try:
        method = build_method(spec["name"], **dict(spec.get("params") or {}))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        method.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{path}: the weights do not fit method {spec['name']!r} with its stored parameters "
            f"({' '.join(first[:3])[:300]})"
        ) from None
    return method, f"{spec['name']}-{path.stem}"


def load_extractor(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    multiscale: bool = False,
    **options: Any,
) -> Extractor:
    """Return ``extractor(image, max_keypoints=4096) -> Features`` (see the module docstring).

    Args:
        checkpoint: path of an s2study or official R2D2 checkpoint, a weights name or a
            baseline name.
        device: torch device of network methods (``cpu``, ``cuda``, ``auto``).
        multiscale: extract on the method's image pyramid (R2D2, D2-Net).
        options: further options of the method's ``extract`` or of the baseline's factory.

    Raises:
        CheckpointError: the file is not a usable checkpoint (unreadable, unknown method or
            parameters, weights that do not fit).
        ConfigError: neither a file nor a baseline name (lists the baselines), or an option
            the method does not take.
        EnvironmentProblem: CUDA requested but absent.
    """
    if multiscale:
        options = {"multiscale": True, **options}
    from s2study.resolver import is_weights_name, resolve_weights

    path = Path(checkpoint).expanduser()
    if not path.exists() and is_weights_name(str(checkpoint)):
        path = resolve_weights(str(checkpoint))  # fetched into the cache on first use
    if path.is_dir():
        raise CheckpointError(f"{path.absolute()}: is a directory, expected a checkpoint file")
    if path.is_file():
        dev = resolve_device(device)
        method, name = _method_from_file(path)
        _check_extract_options(method, options)
        suffix = "+ms" if options.get("multiscale") else ""
        # the method's resolved parameters are part of the key: defaults of the code can change
        key = make_cache_key("checkpoint", file_digest(path), method.params, options)
        return MethodExtractor(method, name + suffix, key, dev, options)

    from s2study.baselines import load_baselines
    from s2study.registry import unknown_name_message

    baselines = load_baselines()
    name = str(checkpoint)
    if name not in baselines:
        raise ConfigError(
            f"no checkpoint file at {path.absolute()}, and "
            + unknown_name_message("baseline", name, baselines.names())
        )
    return baselines.get(name)(**options)
