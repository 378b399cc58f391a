"""Image pairs as datasets hand them out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class PairSample:
    """One cross-modality pair.

    Attributes:
        image_a: (H_a, W_a, 3) uint8 RGB visible image (gray images are replicated to 3 channels).
        image_b: (H_b, W_b, 3) uint8 RGB infrared image (thermal or near-infrared).
        homography: (3, 3) float64 mapping A's pixels onto B's (identity for aligned pairs).
        pair_id: the dataset's id of the pair.
        modality_a, modality_b: e.g. ``"vis"`` and ``"tir"`` / ``"nir"``.
    """

    image_a: np.ndarray
    image_b: np.ndarray
    homography: np.ndarray = field(default_factory=lambda: np.eye(3))
    pair_id: str = ""
    modality_a: str = "vis"
    modality_b: str = "ir"


class PairDataset(Protocol):
    """What every dataset provides: a length, indexed pairs, ids."""

    ids: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> PairSample: ...
