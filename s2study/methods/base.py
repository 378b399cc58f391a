"""The method interface every detect-and-describe network implements.

A method is a ``torch.nn.Module``:

- ``forward(images)``: images (B, 3, H, W) float in [0, 1] -> :class:`DenseFeatures`
  (dense L2-normalised descriptors and detection score maps, possibly at a lower resolution
  than the input; ``stride`` says how much lower);
- ``loss(out_a, out_b, flow, valid)``: the method's own loss ``L_f`` on a batch of pairs with
  dense ground truth A -> B (see :mod:`s2study.geometry`); returns a dict of named scalar
  parts with a ``"total"`` entry;
- ``extract(image, max_keypoints)``: keypoints, scores and descriptors of one image.

The S2 joint loss (:mod:`s2study.s2loss`) wraps any method; methods know nothing about S2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from s2study.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


@dataclass
class DenseFeatures:
    """Network output for a batch.

    Attributes:
        descriptors: (B, D, h, w) L2-normalised along D.
        scores: (B, 1, h, w) detection scores (higher is better).
        extras: method-specific maps the loss needs (e.g. R2D2's ``repeatability`` and
            ``reliability``), each (B, C, h, w).
        stride: input pixels per feature-map pixel (1 for R2D2, 8 or 4 for D2-Net).
    """

    descriptors: Tensor
    scores: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    stride: int = 1

    def select(self, index: slice | Tensor) -> DenseFeatures:
        """The same features for a subset of the batch."""
        return DenseFeatures(
            self.descriptors[index],
            self.scores[index],
            {k: v[index] for k, v in self.extras.items()},
            self.stride,
        )

    def split(self, sizes: list[int]) -> list[DenseFeatures]:
        """Consecutive batch chunks of the given sizes.

        Unlike several :meth:`select` calls, the backward of a split writes each map's
        gradient once, instead of a zero-filled full-size gradient per chunk summed up.
        """
        maps = {"descriptors": self.descriptors, "scores": self.scores, **self.extras}
        chunks = {k: torch.split(v, sizes) for k, v in maps.items()}
        return [
            DenseFeatures(
                chunks["descriptors"][i],
                chunks["scores"][i],
                {k: chunks[k][i] for k in self.extras},
                self.stride,
            )
            for i in range(len(sizes))
        ]


@dataclass
class Keypoints:
    """Sparse features of one image, sorted by decreasing score.

    Attributes:
        xy: (N, 2) float32 ``(x, y)`` in the input image's pixel coordinates.
        scores: (N,) float32.
        descriptors: (N, D) float32, L2-normalised.
    """

    xy: Tensor
    scores: Tensor
    descriptors: Tensor

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    def top(self, k: int) -> Keypoints:
        """The ``k`` best keypoints (all of them when there are fewer)."""
        return Keypoints(self.xy[:k], self.scores[:k], self.descriptors[:k])

    def to(self, device) -> Keypoints:
        return Keypoints(self.xy.to(device), self.scores.to(device), self.descriptors.to(device))


class Method(nn.Module):
    """Base class of trainable methods; subclasses set ``name``, ``default_params``."""

    name: ClassVar[str] = ""
    #: the method's hyperparameters and their defaults; configs may override only these keys
    default_params: ClassVar[dict[str, Any]] = {}
    #: training crop size the paper uses
    default_crop: ClassVar[int] = 256

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = {**self.default_params, **params}

    def forward(self, images: Tensor) -> DenseFeatures:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(
        self, out_a: DenseFeatures, out_b: DenseFeatures, flow: Tensor, valid: Tensor
    ) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """``L_f``: flow (B, H, W, 2) A -> B at input resolution; valid (B, H, W) bool."""
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, image: Tensor, max_keypoints: int) -> Keypoints:  # pragma: no cover
        """image: (1, 3, H, W) float in [0, 1] on the method's device."""
        raise NotImplementedError

    def load_pretrained(self, path: str) -> None:
        """Initialise from a third-party weight file (official checkpoint, VGG16...)."""
        raise NotImplementedError(f"{self.name} has no pretrained-weight loader")

    @classmethod
    def pretrained_params(cls, path: str) -> dict[str, Any]:
        """The architecture parameters a weight file implies (for the ones a config leaves
        unset, so ``method.weights: r2d2_WASF_N8_big`` alone builds the net that file needs)."""
        return {}
