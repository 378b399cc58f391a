"""The models shipped in weights/: listed with their checksum, loadable, what their cards say."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

import s2study
from s2study.checkpoint import load_checkpoint

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
FILES = sorted(p.name for p in WEIGHTS.glob("*.pt"))
CARD = (WEIGHTS / "README.md").read_text()


def test_every_shipped_model_has_a_card_with_its_checksum():
    assert FILES, "no shipped models"
    for name in FILES:
        digest = hashlib.sha256((WEIGHTS / name).read_bytes()).hexdigest()
        section = CARD.split(f"## {name}")[1].split("\n## ")[0]
        assert digest in section, f"{name}: sha256 {digest} is not in its model card"
        assert "optimizer" not in load_checkpoint(WEIGHTS / name)  # shipped small


@pytest.mark.parametrize("name", FILES)
def test_shipped_model_extracts_features(name, roadscene):
    ckpt = load_checkpoint(WEIGHTS / name)
    card_lambda = re.search(r"lambda = ([\d.]+)", CARD.split(f"## {name}")[1])
    assert ckpt["config"]["lambda_ssl"] == pytest.approx(float(card_lambda.group(1)))
    image = cv2.imread(str(roadscene / "crop_LR_visible" / "FLIR_00006.jpg"))
    assert image is not None
    xy, scores, desc = s2study.load_extractor(WEIGHTS / name)(image[:, :, ::-1].copy(), max_keypoints=512)
    assert xy.shape == (512, 2) and desc.shape == (512, 128)
    assert np.allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-4)
    assert np.all(np.diff(scores) <= 0)
