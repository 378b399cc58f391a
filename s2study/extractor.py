"""``load_extractor``: one call from a checkpoint, a third-party weight file or name, or a
baseline name to an :class:`~s2study.features.Extractor` (design.md section 4).

What ``checkpoint`` may be, tried in this order:

1. an existing file: an s2study checkpoint (:mod:`s2study.checkpoint`; the network is rebuilt
   from the method name and hyperparameters it stores, and its weights load strictly), or a
   third-party weight file: the method is the one the resolver lists for that file (by
   content, then by file name: ``aliked-n16.pth`` -> ``aliked``, ``r2d2_WASF_N16.pt`` ->
   ``r2d2``), else the method whose ``Method.recognizes`` accepts the file (the official R2D2
   format, a dict with ``net`` and ``state_dict``, whose ``net`` string is parsed against
   R2D2's whitelist, never evaluated); the network is ``Method.from_pretrained(file)``;
2. a weights name (``official``, ``r2d2_WASF_N16``, ``faster2d2_WASF_N16``, ``aliked-n16``,
   ...), resolved to its file by :mod:`s2study.resolver` (fetched into the cache on first use)
   and built by the method the resolver names for it;
3. the name of a baseline registered in :data:`s2study.baselines.BASELINES` (``sift``,
   ``rift``; ``cmm-net`` is reserved and explains why it cannot run).

Every extractor takes a uint8 image, HxW (gray, replicated to RGB) or HxWx3 (RGB), and returns
:class:`~s2study.features.Features` in the input's pixel coordinates, sorted by decreasing
score, at most ``max_keypoints`` of them, with float32 L2-normalised descriptors. It carries a
``name`` for tables and a ``cache_key`` naming its weights and settings. The extraction
options a method takes are those its class declares (``Method.extract_options``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2study.errors import CheckpointError, ConfigError, EnvironmentProblem
from s2study.features import (
    Extractor,
    Features,
    as_rgb_uint8,
    check_max_keypoints,
    file_digest,
    finalize_features,
    make_cache_key,
)
from s2study.methods.base import Method


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
        kp = self.method.extract(tensor, k, **self.options)  # eval mode, no autograd
        return finalize_features(kp.keypoints, kp.scores, kp.descriptors, k)

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


def _load_raw(path: Path) -> Any:
    from s2study.checkpoint import safe_torch_load

    return safe_torch_load(path, "checkpoint")


def _method_from_file(path: Path, weights_name: str | None = None) -> tuple[Method, str]:
    """Rebuild the network stored in ``path``; returns it and its default table name.

    Args:
        path: an s2study checkpoint or a third-party weight file.
        weights_name: the resolver's name of the file, when it was given by name.
    """
    from s2study.checkpoint import load_checkpoint
    from s2study.methods import build_method

    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as not_ours:
        cls = _third_party_method(path, weights_name)
        if cls is None:
            raise not_ours from None
        return cls.from_pretrained(path), path.stem
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


def _third_party_method(path: Path, weights_name: str | None) -> type[Method] | None:
    """The method class of a weight file that is not an s2study checkpoint (None: unknown).

    The resolver's entry decides when the file is one it lists (by name, by content, by file
    name); otherwise each method's ``recognizes`` looks at the loaded file.
    """
    from s2study.methods import load_methods
    from s2study.resolver import WEIGHTS, weights_entry

    methods = load_methods()
    entry = weights_entry(weights_name) if weights_name else None
    if entry is None:
        by_file = [w for w in WEIGHTS.values() if w.file == path.name]
        if by_file:
            digest = file_digest(path)
            entry = next((w for w in WEIGHTS.values() if w.sha256 == digest), by_file[0])
    if entry is not None and entry.method in methods:
        return methods.get(entry.method)
    raw = _load_raw(path)
    return next((cls for _, cls in methods.items() if cls.recognizes(raw)), None)


def load_extractor(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    multiscale: bool = False,
    **options: Any,
) -> Extractor:
    """Return ``extractor(image, max_keypoints=4096) -> Features`` (see the module docstring).

    Args:
        checkpoint: path of an s2study or official R2D2 checkpoint, a weights name, a
            registered model (``models:/NAME/VERSION``, ``models:/NAME/latest``, see
            :mod:`s2study.model_registry`) or a baseline name.
        device: torch device of network methods (``cpu``, ``cuda``, ``auto``).
        multiscale: extract on the method's image pyramid (R2D2, D2-Net).
        options: further options of the method's ``extract`` (``Method.extract_options``)
            or of the baseline's factory.

    Raises:
        CheckpointError: the file is not a usable checkpoint (unreadable, unknown method or
            parameters, weights that do not fit).
        ConfigError: neither a file nor a baseline name (lists the baselines), or an option
            the method does not take.
        EnvironmentProblem: CUDA requested but absent.
    """
    if multiscale:
        options = {"multiscale": True, **options}
    from s2study.model_registry import is_model_uri, resolve_model_uri
    from s2study.resolver import is_weights_name, resolve_weights

    path = Path(checkpoint).expanduser()
    weights_name = None
    if is_model_uri(str(checkpoint)):
        path = resolve_model_uri(str(checkpoint))  # a registered model version, downloaded once
    elif not path.exists() and is_weights_name(str(checkpoint)):
        weights_name = str(checkpoint)
        path = resolve_weights(weights_name)  # fetched into the cache on first use
    if path.is_dir():
        raise CheckpointError(f"{path.absolute()}: is a directory, expected a checkpoint file")
    if path.is_file():
        dev = resolve_device(device)
        method, name = _method_from_file(path, weights_name)
        method.check_extract_options(options)
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
