"""SIFT baseline (OpenCV), evaluation only; registered as ``"sift"``.

Keypoints are OpenCV's SIFT detections on the gray image, ranked by detector response, the
top K kept. The contrast threshold is lowered from Lowe's 0.04 to 0.002 so that enough
candidates exist for K = 4096 wherever the image has the structure (the ranking, not the
threshold, chooses the keypoints; smooth RoadScene infrared images still yield fewer than 4096,
and then all of them are returned). Descriptors are OpenCV's 128-D SIFT descriptors,
L2-normalised as they are: plain SIFT, not RootSIFT. A location detected with several
dominant orientations gives several keypoints, as in OpenCV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from s2study.baselines import BASELINES
from s2study.errors import ConfigError
from s2study.features import (
    Features,
    as_rgb_uint8,
    check_max_keypoints,
    finalize_features,
    make_cache_key,
)
from s2study.registry import unknown_name_message


@dataclass(frozen=True)
class SIFTConfig:
    """OpenCV ``SIFT_create`` settings (names as OpenCV's, snake case).

    Attributes:
        contrast_threshold: DoG contrast below which candidates are dropped.
        edge_threshold: principal-curvature ratio above which edge responses are dropped.
        n_octave_layers: scales per octave.
        sigma: Gaussian sigma of the first octave.
    """

    contrast_threshold: float = 0.002
    edge_threshold: float = 10.0
    n_octave_layers: int = 3
    sigma: float = 1.6

    def __post_init__(self) -> None:
        if not (
            self.contrast_threshold >= 0
            and self.edge_threshold > 0
            and self.n_octave_layers >= 1
            and self.sigma > 0
        ):
            raise ConfigError(
                "sift: need contrast_threshold >= 0, edge_threshold > 0, n_octave_layers >= 1 and "
                f"sigma > 0; got {asdict(self)}"
            )


class SIFT:
    """``extractor(image, max_keypoints)`` with OpenCV SIFT (see the module docstring)."""

    name = "sift"

    def __init__(self, config: SIFTConfig = SIFTConfig()) -> None:
        self.config = config
        self.cache_key = make_cache_key("sift", cv2.__version__, asdict(config))
        self._sift = cv2.SIFT_create(
            nfeatures=0,
            nOctaveLayers=config.n_octave_layers,
            contrastThreshold=config.contrast_threshold,
            edgeThreshold=config.edge_threshold,
            sigma=config.sigma,
        )

    def __call__(self, image: np.ndarray, max_keypoints: int = 4096) -> Features:
        """image: uint8 HxW or HxWx3 RGB. Returns the ``max_keypoints`` strongest features."""
        k = check_max_keypoints(max_keypoints)
        gray = cv2.cvtColor(as_rgb_uint8(image), cv2.COLOR_RGB2GRAY)
        detected = self._sift.detect(gray, None)
        detected = sorted(detected, key=lambda kp: -kp.response)[:k]
        detected, desc = self._sift.compute(gray, detected)
        if desc is None or not detected:
            return finalize_features(np.zeros((0, 2)), np.zeros(0), np.zeros((0, 128)), k)
        xy = np.array([kp.pt for kp in detected], dtype=np.float32)
        scores = np.array([kp.response for kp in detected], dtype=np.float32)
        return finalize_features(xy, scores, desc, k)


@BASELINES.register("sift")
def sift(**settings: object) -> SIFT:
    """Build the SIFT baseline; ``settings`` are :class:`SIFTConfig` fields."""
    known = [f.name for f in fields(SIFTConfig)]
    for key in settings:
        if key not in known:
            raise ConfigError(unknown_name_message("sift setting", key, known))
    return SIFT(SIFTConfig(**settings))  # type: ignore[arg-type]
