"""load_extractor on the official R2D2 file, s2study checkpoints and baselines; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import s2study
from s2study.checkpoint import save_checkpoint
from s2study.data.datasets import read_image
from s2study.errors import CheckpointError, ConfigError, DataError, EnvironmentProblem
from s2study.extractor import extract_features, load_extractor
from s2study.methods.r2d2 import R2D2


def check_features(feats, k: int, shape: tuple[int, int], dim: int) -> None:
    """The interface's promises: sorted by score, N <= K, float32, unit descriptors, in bounds."""
    n = len(feats.keypoints)
    assert 0 < n <= k
    assert (
        feats.keypoints.shape == (n, 2)
        and feats.scores.shape == (n,)
        and feats.descriptors.shape == (n, dim)
    )
    assert all(a.dtype == np.float32 for a in feats)
    assert np.all(np.diff(feats.scores) <= 0)
    np.testing.assert_allclose(np.linalg.norm(feats.descriptors, axis=1), 1.0, atol=1e-5)
    h, w = shape
    assert feats.keypoints[:, 0].min() >= -0.5 and feats.keypoints[:, 0].max() <= w - 0.5
    assert feats.keypoints[:, 1].min() >= -0.5 and feats.keypoints[:, 1].max() <= h - 0.5


@pytest.fixture(scope="module")
def visible(roadscene):
    pair_id = (roadscene / "splits" / "val.txt").read_text().split()[0]
    return read_image(roadscene / "crop_LR_visible" / f"{pair_id}.jpg")


@pytest.fixture(scope="module")
def crop(visible):
    """A small real crop: the R2D2 network runs on it in about a second on a CPU."""
    return np.ascontiguousarray(visible[40:136, 100:260])


# ----------------------------------------------------------------------------- R2D2


@pytest.fixture(scope="module")
def official(official_r2d2):
    return load_extractor(official_r2d2)


def test_official_r2d2_features(official, crop, official_r2d2):
    feats = official(crop, max_keypoints=300)
    check_features(feats, 300, crop.shape[:2], 128)
    assert official.name == "r2d2_WASF_N16"
    # the same as the network's own extraction, in the same order
    net = R2D2.from_official_checkpoint(official_r2d2).eval()
    image = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    direct = net.extract(image, 300)
    np.testing.assert_allclose(feats.keypoints, direct.xy.numpy())
    np.testing.assert_allclose(feats.scores, direct.scores.numpy())


def test_gray_input_is_replicated(official, crop):
    gray = np.ascontiguousarray(crop[:, :, 1])
    as_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    a, b = official(gray, 100), official(as_rgb, 100)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_cache_key_tracks_file_and_options(official, official_r2d2, tmp_path):
    assert load_extractor(official_r2d2).cache_key == official.cache_key
    multiscale = load_extractor(official_r2d2, multiscale=True)
    assert multiscale.cache_key != official.cache_key and multiscale.name.endswith("+ms")
    copy = tmp_path / "copy.pt"
    copy.write_bytes(official_r2d2.read_bytes())
    assert load_extractor(copy).cache_key == official.cache_key  # keyed on content, not path


def test_s2study_checkpoint_round_trip(official, official_r2d2, crop, tmp_path):
    net = R2D2.from_official_checkpoint(official_r2d2)
    path = save_checkpoint(
        tmp_path / "best.pt",
        {"method": {"name": "r2d2", "params": dict(net.params)}, "model": net.state_dict()},
    )
    ours = s2study.load_extractor(path)
    assert ours.name == "r2d2-best"
    a, b = ours(crop, 200), official(crop, 200)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)

    state = net.state_dict()
    state.pop(next(iter(state)))
    broken = save_checkpoint(
        tmp_path / "broken.pt", {"method": {"name": "r2d2", "params": {}}, "model": state}
    )
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_extractor(broken)
    other = save_checkpoint(
        tmp_path / "other.pt", {"method": {"name": "r2d3", "params": {}}, "model": {}}
    )
    with pytest.raises(
        CheckpointError, match="other.pt: unknown method 'r2d3' .did you mean 'r2d2'"
    ):
        load_extractor(other)


def test_unknown_extract_option(official_r2d2):
    with pytest.raises(ConfigError, match="accepts: multiscale"):
        load_extractor(official_r2d2, nms_radius=3)


# ----------------------------------------------------------------------------- SIFT


def test_sift_features(roadscene, visible):
    sift = load_extractor("sift")
    assert sift.name == "sift"
    feats = sift(visible, 1000)
    check_features(feats, 1000, visible.shape[:2], 128)
    prefix = sift(visible, 100)  # extracting at a smaller K gives the prefix (evaluation slices)
    for x, y in zip(prefix, feats):
        np.testing.assert_array_equal(x, y[:100])
    gray = np.ascontiguousarray(visible.mean(axis=2).astype(np.uint8))
    a, b = sift(gray, 200), sift(np.repeat(gray[:, :, None], 3, axis=2), 200)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)


def test_sift_has_4096_keypoints_on_a_textured_roadscene_image(roadscene):
    pair_id = (roadscene / "splits" / "val.txt").read_text().split()[2]
    image = read_image(roadscene / "crop_LR_visible" / f"{pair_id}.jpg")
    assert len(load_extractor("sift")(image, 4096).keypoints) == 4096


def test_sift_settings_and_cache_key():
    assert (
        load_extractor("sift", contrast_threshold=0.01).cache_key
        != load_extractor("sift").cache_key
    )
    with pytest.raises(ConfigError, match="did you mean 'contrast_threshold'"):
        load_extractor("sift", contrast_treshold=0.01)
    with pytest.raises(ConfigError, match="multiscale"):
        load_extractor("sift", multiscale=True)
    with pytest.raises(ConfigError, match="contrast_threshold >= 0"):
        load_extractor("sift", contrast_threshold=-1.0)


def test_extract_features_from_path(roadscene):
    pair_id = (roadscene / "splits" / "val.txt").read_text().split()[0]
    feats = extract_features(
        load_extractor("sift"), roadscene / "cropinfrared" / f"{pair_id}.jpg", k=50
    )
    assert len(feats.keypoints) == 50
    with pytest.raises(ConfigError, match="positive integer"):
        extract_features(load_extractor("sift"), roadscene / "cropinfrared" / f"{pair_id}.jpg", k=0)


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_name_lists_baselines(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_extractor("sfit")
    message = str(info.value)
    assert "no checkpoint file at" in message and "did you mean 'sift'" in message
    assert "cmm-net" in message and "sift" in message


def test_reserved_cmm_net():
    with pytest.raises(ConfigError, match="no public Python implementation"):
        load_extractor("cmm-net")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_extractor(tmp_path)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt: not a readable checkpoint"):
        load_extractor(text)
    other = tmp_path / "dict.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not an s2study checkpoint"):
        load_extractor(other)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message shown when CUDA is absent"
)
def test_cuda_requested_without_cuda(official_r2d2):
    with pytest.raises(EnvironmentProblem, match="CUDA is not available"):
        load_extractor(official_r2d2, device="cuda")


def test_bad_images():
    sift = load_extractor("sift")
    with pytest.raises(DataError, match="uint8"):
        sift(np.zeros((20, 20), np.float32))
    with pytest.raises(DataError, match="HxW or HxWx3"):
        sift(np.zeros((20, 20, 4), np.uint8))
    with pytest.raises(ConfigError, match="positive integer"):
        sift(np.zeros((20, 20), np.uint8), max_keypoints=0)
