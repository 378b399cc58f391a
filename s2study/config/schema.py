"""Typed, validated configuration: one frozen dataclass per concern.

YAML maps onto these classes strictly (see :mod:`s2study.config.load`): unknown keys, wrong
types and out-of-range values are rejected at load with a message naming the key.
Range checks live in ``__post_init__`` and raise ``ValueError``; the loader turns them into
:class:`~s2study.errors.ConfigError` with the file and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: training arithmetic choices (see :attr:`TrainConfig.precision`)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _range(name: str, lo_hi: tuple[float, float], lo: float, hi: float) -> None:
    a, b = lo_hi
    _check(lo <= a <= b <= hi, f"{name}: {[a, b]} must be a range [min, max] within [{lo}, {hi}]")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and splits a run uses.

    Attributes:
        dataset: registered dataset name: ``roadscene``, ``rgbnir`` or ``folder``.
        root: dataset folder; None resolves the dataset by name (:mod:`s2study.resolver`:
            ``S2STUDY_DATA``, the cache, ``../shared/data`` of a checkout, else a download).
        train_split / val_split / test_split: split names (RoadScene split files; for RGB-NIR
            and folders a split by image index, see the loaders).
        max_train_pairs / max_val_pairs: cap the number of pairs (None: all).
        val_max_size: validation images are resized so their long side is at most this.
    """

    dataset: str = "roadscene"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_train_pairs: int | None = None
    max_val_pairs: int | None = None
    val_max_size: int | None = None

    def __post_init__(self) -> None:
        for k in ("max_train_pairs", "max_val_pairs", "val_max_size"):
            v = getattr(self, k)
            _check(v is None or v > 0, f"{k}: must be > 0 (or null), got {v}")


@dataclass(frozen=True)
class SSLAugmentConfig:
    """The SSL cascade ``T = Ts . Tr . Tq . Tn . Tb . Ti`` (paper, section II-B).

    Attributes:
        scale: random scale range (Ts).
        rotation_deg: rotation drawn uniformly in [-r, r] degrees (Tr).
        perspective: quadrangle projection: corners move by up to this fraction of the size (Tq).
        noise_std: std of additive Gaussian noise on images in [0, 1]; the paper's variance
            0.01 is std 0.1 (Tn).
        blur_sigma: Gaussian blur sigma (Tb).
        invert_prob: probability of the gray inversion above a random threshold (Ti).
        invert_threshold: range of the random threshold in [0, 1].
    """

    scale: tuple[float, float] = (0.8, 1.2)
    rotation_deg: float = 30.0
    perspective: float = 0.2
    noise_std: float = 0.1
    blur_sigma: float = 1.0
    invert_prob: float = 0.5
    invert_threshold: tuple[float, float] = (0.3, 0.9)

    def __post_init__(self) -> None:
        _range("scale", self.scale, 0.1, 10.0)
        _check(0 <= self.rotation_deg <= 180, f"rotation_deg: must be in [0, 180], got {self.rotation_deg}")
        _check(0 <= self.perspective < 0.5, f"perspective: must be in [0, 0.5), got {self.perspective}")
        _check(0 <= self.noise_std <= 1, f"noise_std: must be in [0, 1], got {self.noise_std}")
        _check(0 <= self.blur_sigma <= 10, f"blur_sigma: must be in [0, 10], got {self.blur_sigma}")
        _check(0 <= self.invert_prob <= 1, f"invert_prob: a probability in [0, 1], got {self.invert_prob}")
        _range("invert_threshold", self.invert_threshold, 0.0, 1.0)


@dataclass(frozen=True)
class SLAugmentConfig:
    """The offset added to aligned SL pairs (paper, section III-A).

    Attributes:
        rotation_deg: rotation in [-r, r] degrees applied to the infrared image.
        scale: scale range.
        perspective: projection ratio (corner displacement as a fraction of the size).
        flip_prob: probability of a horizontal flip of the whole pair.
        rot90_prob: probability of a rotation of the whole pair (both images and the ground
            truth, so the pair stays registered up to the offset) by 90, 180 or 270 degrees,
            each equally likely. The paper applies these rotations but names no probability;
            the presets set 0.5 (1/6 each turn); 0 here keeps pairs upright.
        noise_std / blur_sigma: photometric noise and blur on both images.
    """

    rotation_deg: float = 10.0
    scale: tuple[float, float] = (1.0, 1.2)
    perspective: float = 0.2
    flip_prob: float = 0.5
    rot90_prob: float = 0.0
    noise_std: float = 0.02
    blur_sigma: float = 0.5

    def __post_init__(self) -> None:
        _range("scale", self.scale, 0.1, 10.0)
        _check(0 <= self.rotation_deg <= 180, f"rotation_deg: must be in [0, 180], got {self.rotation_deg}")
        _check(0 <= self.perspective < 0.5, f"perspective: must be in [0, 0.5), got {self.perspective}")
        for k in ("flip_prob", "rot90_prob"):
            v = getattr(self, k)
            _check(0 <= v <= 1, f"{k}: a probability in [0, 1], got {v}")
        _check(0 <= self.noise_std <= 1, f"noise_std: must be in [0, 1], got {self.noise_std}")
        _check(0 <= self.blur_sigma <= 10, f"blur_sigma: must be in [0, 10], got {self.blur_sigma}")


@dataclass(frozen=True)
class MethodConfig:
    """The network and its loss.

    Attributes:
        name: registered method: ``r2d2`` or ``d2net``.
        weights: initial weights: a file path, a weights name (``official`` = ``r2d2_WASF_N16``,
            ``r2d2_WAF_N16``, ``faster2d2_WASF_N16``, ...; resolved and fetched by
            :mod:`s2study.resolver`) or None (random init; D2-Net also accepts a torchvision
            VGG16 file).
        params: method hyperparameters; only keys of the method's ``default_params``.
    """

    name: str = "r2d2"
    weights: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """One training run of the S2 trainer.

    Attributes:
        lambda_ssl: weight of the SSL terms, ``L = L_SL + lambda (L_SSL_vis + L_SSL_ir)``.
        ssl_vis / ssl_ir: switch each SSL term on or off.
        epochs: training epochs; steps_per_epoch: optimiser steps per epoch (None: one pass
            over the training pairs in batches).
        batch_size: pairs per step (each gives an SL pair and two SSL pairs).
        crop_size: square training crop (None: the method's paper default).
        lr / weight_decay: Adam (None: the method's paper defaults).
        val_k: keypoints per image for validation (``val_ncm`` is NCM at this K).
        val_threshold_px: NCM threshold.
        seed: seeds python, numpy and torch.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        precision: training arithmetic. ``auto``: bf16 autocast where the device computes
            bf16 natively (CUDA with bf16, fp16 with loss scaling on older GPUs; CPUs with
            AMX), fp32 elsewhere. ``fp32``, ``bf16`` or ``fp16`` (CUDA only) force one.
        compile: ``torch.compile`` the network for the training steps (validation runs it
            uncompiled): compiling takes a minute or more, so it pays off on long GPU runs.
        num_workers: data-loading worker processes; None (the default) picks them from the
            device and the CPU threads this process may use (``torch.get_num_threads()``, a
            study trial's ``resources.cpu``): on CUDA ``threads - 1`` (at most 8), so image
            decoding runs beside the GPU; on the CPU 0, as workers would take cores from the
            training threads (see :func:`s2study.train.loader_workers`).
        max_nonfinite_steps: consecutive non-finite losses tolerated before the run fails.
        mirror: where named datasets and weights are downloaded from when no local copy
            exists: a URL prefix (``http(s)://``, ``file://`` or ``s3://``) replacing every public
            URL; None: ``$S2STUDY_MIRROR``, else the public sources (:mod:`s2study.resolver`).
    """

    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    ssl: SSLAugmentConfig = field(default_factory=SSLAugmentConfig)
    sl: SLAugmentConfig = field(default_factory=SLAugmentConfig)
    lambda_ssl: float = 0.4
    ssl_vis: bool = True
    ssl_ir: bool = True
    epochs: int = 10
    steps_per_epoch: int | None = None
    batch_size: int = 2
    crop_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    val_k: int = 1024
    val_threshold_px: float = 3.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    num_workers: int | None = None
    max_nonfinite_steps: int = 3
    mirror: str | None = None

    def __post_init__(self) -> None:
        _check(self.mirror is None or self.mirror.startswith(("http://", "https://", "file://", "s3://")),
               f"mirror: {self.mirror!r} is not allowed; expected a URL prefix starting with "
               "http://, https://, file:// or s3://")
        _check(self.lambda_ssl >= 0, f"lambda_ssl: must be >= 0, got {self.lambda_ssl}")
        _check(self.epochs >= 1, f"epochs: must be >= 1, got {self.epochs}")
        _check(self.steps_per_epoch is None or self.steps_per_epoch >= 1,
               f"steps_per_epoch: must be >= 1 (or null), got {self.steps_per_epoch}")
        _check(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        _check(self.crop_size is None or 16 <= self.crop_size <= 2048,
               f"crop_size: must be in [16, 2048] (or null), got {self.crop_size}")
        _check(self.lr is None or self.lr > 0, f"lr: must be > 0, got {self.lr}")
        _check(self.weight_decay is None or self.weight_decay >= 0,
               f"weight_decay: must be >= 0, got {self.weight_decay}")
        _check(self.val_k >= 1, f"val_k: must be >= 1, got {self.val_k}")
        _check(self.val_threshold_px > 0, f"val_threshold_px: must be > 0, got {self.val_threshold_px}")
        _check(self.device in ("auto", "cpu", "cuda"), f"device: one of auto, cpu, cuda; got {self.device!r}")
        _check(self.precision in PRECISIONS,
               f"precision: one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        _check(self.precision != "fp16" or self.device != "cpu",
               "precision: fp16 needs CUDA (device is cpu); use bf16 or fp32")
        _check(self.num_workers is None or self.num_workers >= 0,
               f"num_workers: must be >= 0 (or null for automatic), got {self.num_workers}")
        _check(self.max_nonfinite_steps >= 1, f"max_nonfinite_steps: must be >= 1, got {self.max_nonfinite_steps}")
