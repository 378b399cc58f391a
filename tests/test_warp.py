"""The warped evaluation protocol (``--warp SEED``) on real RoadScene images with SIFT."""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import pytest
from test_evaluate import CountingExtractor  # the real SIFT, counting its runs

from s2study.cli import main
from s2study.config.schema import DataConfig
from s2study.data import warp as warp_module
from s2study.data.datasets import open_dataset, read_image
from s2study.data.pairs import PairSample
from s2study.data.warp import (
    CORNER_JITTER,
    ROTATION_DEG,
    SCALE,
    WarpedPairs,
    check_seed,
    draw_warp,
)
from s2study.errors import ConfigError
from s2study.evaluate import (
    EvalResult,
    evaluate,
    evaluate_checkpoint,
    format_table,
    read_json,
    write_csv,
)
from s2study.extractor import load_extractor

K = 512


class ListPairs:
    """A minimal PairDataset over samples held in memory."""

    def __init__(self, samples: list[PairSample], name: str = "listed") -> None:
        self.samples, self.name = samples, name
        self.ids = [s.pair_id for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> PairSample:
        return self.samples[index]


@pytest.fixture(scope="module")
def val_pairs(roadscene):
    return open_dataset(DataConfig(dataset="roadscene", root=str(roadscene)), "val")


@pytest.fixture(scope="module")
def visible(roadscene, val_pairs):
    """(pair id, a real RoadScene visible image)."""
    pair_id = val_pairs.ids[0]
    return pair_id, read_image(roadscene / "crop_LR_visible" / f"{pair_id}.jpg")


@pytest.fixture(scope="module")
def sift():
    return load_extractor("sift")


def _corners(h: int, w: int) -> np.ndarray:
    return np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float32)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(points.reshape(-1, 1, 2).astype(np.float64), matrix)[:, 0]


# ----------------------------------------------------------------------------- the draw


def test_draw_is_deterministic_per_seed_and_pair():
    h, w = 252, 541
    a = draw_warp(0, "FLIR_00548", h, w).matrix
    assert np.array_equal(a, draw_warp(0, "FLIR_00548", h, w).matrix)
    assert not np.allclose(a, draw_warp(1, "FLIR_00548", h, w).matrix)
    assert not np.allclose(a, draw_warp(0, "FLIR_00550", h, w).matrix)
    # a subset of a split gets the same warps: the draw depends on the id, not the index
    samples = [
        PairSample(np.zeros((h, w, 3), np.uint8), np.zeros((h, w, 3), np.uint8), pair_id=i)
        for i in ("FLIR_00548", "FLIR_00550")
    ]
    whole, subset = WarpedPairs(ListPairs(samples), 3), WarpedPairs(ListPairs(samples[1:]), 3)
    assert np.array_equal(whole[1].homography, subset[0].homography)


def test_draw_ranges_and_matrix():
    """Angle, scale and jitter in range; the matrix is the jitter (OpenCV's corner homography)
    after the rotation-scale about the centre (OpenCV's getRotationMatrix2D)."""
    h, w = 252, 541
    angles, scales = [], []
    for seed in range(40):
        d = draw_warp(seed, "FLIR_00548", h, w)
        assert abs(d.angle_deg) <= ROTATION_DEG and SCALE[0] <= d.scale <= SCALE[1]
        assert np.abs(d.jitter).max() <= CORNER_JITTER
        corners = _corners(h, w)
        jitter = cv2.getPerspectiveTransform(
            corners, (corners + d.jitter * [w - 1, h - 1]).astype(np.float32)
        )
        # decompose W: undo the projective part, what is left is a rotation and a scale
        rest = np.linalg.inv(jitter) @ d.matrix
        rest /= rest[2, 2]
        np.testing.assert_allclose(rest[2, :2], 0, atol=1e-6)
        scale = math.sqrt(np.linalg.det(rest[:2, :2]))
        angle = math.degrees(math.atan2(rest[1, 0], rest[0, 0]))  # clockwise on screen
        assert scale == pytest.approx(d.scale, abs=1e-4)
        assert angle == pytest.approx(d.angle_deg, abs=1e-3)
        np.testing.assert_allclose(
            rest[:2, :2] / scale @ (rest[:2, :2] / scale).T, np.eye(2), atol=1e-5
        )  # a pure rotation times the scale
        centre = np.array([[(w - 1) / 2, (h - 1) / 2]])
        np.testing.assert_allclose(_apply(rest, centre), centre, atol=1e-3)  # about the centre
        rotation = cv2.getRotationMatrix2D(tuple(centre[0]), -d.angle_deg, d.scale)
        expected = jitter @ np.vstack([rotation, [0, 0, 1]])
        np.testing.assert_allclose(_apply(d.matrix, corners), _apply(expected, corners), atol=1e-3)
        # mild: no corner moves by more than the rotation, scale and jitter together allow
        moved = np.linalg.norm(_apply(d.matrix, corners) - corners, axis=1)
        assert moved.max() < 0.45 * math.hypot(w, h)
        # mostly inside the frame (the scale >= 1 zooms in)
        inside = warp_module.warp_image(np.full((h, w), 255, np.uint8), d.matrix) > 0
        assert inside.mean() > 0.75
        angles.append(d.angle_deg)
        scales.append(d.scale)
    assert min(angles) < -5 < 5 < max(angles) and max(scales) - min(scales) > 0.1


@pytest.mark.parametrize("bad", [-1, 1.5, True, "x", "-3", "2.0", None])
def test_check_seed_refuses(bad):
    with pytest.raises(ConfigError, match="non-negative integer"):
        check_seed(bad)


def test_check_seed_accepts():
    assert check_seed(0) == 0 and check_seed("17") == 17 and check_seed(np.int64(5)) == 5


# ----------------------------------------------------------------------------- the numbers


def test_known_answer_equals_warping_by_hand(visible, sift):
    """A visible image against itself through WarpedPairs = the same pair warped by hand with
    OpenCV and evaluated with the composed homography; same-modality SIFT matches well."""
    pair_id, image = visible
    h, w = image.shape[:2]
    aligned = ListPairs([PairSample(image, image.copy(), np.eye(3), pair_id)])
    kwargs = {"ks": (K,), "progress": False, "dataset_name": "roadscene", "split": "val"}
    through = evaluate([sift], WarpedPairs(aligned, 7), **kwargs)

    matrix = draw_warp(7, pair_id, h, w).matrix
    by_hand = cv2.warpPerspective(
        image,
        matrix,
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    hand = evaluate(
        [sift],
        ListPairs([PairSample(image, by_hand, matrix @ np.eye(3), pair_id)]),
        protocol="warped:7",
        **kwargs,
    )
    assert through.pairs["sift"][K] == hand.pairs["sift"][K]  # NC, NCM, CMR, curves: exactly
    assert through.protocol == hand.protocol == "warped:7"
    metrics = through.pairs["sift"][K][0]
    assert metrics.ncm > 100 and metrics.cmr > 60  # W maps A onto the warped B
    # the ground truth matters: the warped pair judged as if aligned finds few correct matches
    wrong = evaluate([sift], ListPairs([PairSample(image, by_hand, np.eye(3), pair_id)]), **kwargs)
    assert wrong.pairs["sift"][K][0].ncm < metrics.ncm / 4
    assert wrong.protocol == "aligned"


def test_composes_with_the_inner_homography(visible):
    pair_id, image = visible
    inner = np.array([[1.0, 0.0, 4.0], [0.0, 1.0, -2.0], [0.0, 0.0, 1.0]])
    sample = WarpedPairs(ListPairs([PairSample(image, image, inner, pair_id)]), 2)[0]
    matrix = draw_warp(2, pair_id, *image.shape[:2]).matrix
    expected = matrix @ inner
    np.testing.assert_allclose(sample.homography, expected / expected[2, 2], atol=1e-12)
    assert sample.image_b.shape == image.shape and sample.image_a is image


# ----------------------------------------------------------------------------- caches


def test_warp_cache_is_reused(visible, tmp_path, monkeypatch):
    pair_id, image = visible
    dataset = WarpedPairs(
        ListPairs([PairSample(image, image, np.eye(3), pair_id)]), 4, cache_dir=tmp_path
    )
    first = dataset[0].image_b
    files = list((tmp_path / "warp-4").glob("*_b.png"))
    assert len(files) == 1 and files[0].name.startswith(pair_id)
    stamp = files[0].stat().st_mtime_ns

    def no_warp(*args, **kwargs):
        raise AssertionError("the cached warped image was recomputed")

    monkeypatch.setattr(warp_module, "warp_image", no_warp)
    second = dataset[0].image_b
    assert np.array_equal(first, second)  # PNG is lossless: cached == computed
    assert files[0].stat().st_mtime_ns == stamp
    monkeypatch.undo()
    # another B image for the same id (e.g. another size limit) is not served the stale entry
    smaller = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2))
    other = WarpedPairs(
        ListPairs([PairSample(smaller, smaller, np.eye(3), pair_id)]), 4, cache_dir=tmp_path
    )
    assert other[0].image_b.shape == smaller.shape
    assert len(list((tmp_path / "warp-4").glob("*_b.png"))) == 2
    # a truncated entry (a killed run) is recomputed and replaced
    files[0].write_bytes(b"\x89PNG")
    assert np.array_equal(dataset[0].image_b, first)


def test_warped_features_never_reuse_aligned_ones(val_pairs, tmp_path):
    """One feature cache for both protocols: the warped run extracts its B images anew (their
    content differs, so does their cache key) and reuses the A images."""
    extractor = CountingExtractor()
    kwargs = {"ks": (256,), "progress": False, "max_pairs": 2, "cache_dir": tmp_path}
    aligned = evaluate([extractor], val_pairs, **kwargs)
    assert extractor.calls == 4
    warped = evaluate([extractor], WarpedPairs(val_pairs, 0, cache_dir=tmp_path), **kwargs)
    assert extractor.calls == 6  # the two warped B images only
    assert len(list((tmp_path / extractor.cache_key).glob("*.npz"))) == 6
    again = evaluate([extractor], WarpedPairs(val_pairs, 0, cache_dir=tmp_path), **kwargs)
    assert extractor.calls == 6
    assert again.pairs == warped.pairs and warped.pairs != aligned.pairs
    assert (aligned.protocol, warped.protocol) == ("aligned", "warped:0")


# ----------------------------------------------------------------------------- results


def test_protocol_in_json_csv_and_table(visible, sift, tmp_path):
    pair_id, image = visible
    dataset = WarpedPairs(ListPairs([PairSample(image, image, np.eye(3), pair_id)]), 11)
    result = evaluate([sift], dataset, ks=(256,), progress=False, out_dir=tmp_path)
    assert result.protocol == "warped:11" and result.dataset == "listed"
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["protocol"] == "warped:11"
    loaded = read_json(tmp_path / "eval.json")
    assert loaded.protocol == "warped:11" and loaded.to_dict() == result.to_dict()
    del data["protocol"]  # a file written before the field existed
    assert EvalResult.from_dict(data).protocol == "aligned"
    rows = list(csv.DictReader((tmp_path / "eval.csv").open()))
    assert [r["protocol"] for r in rows] == ["warped:11"]
    assert "protocol warped:11" in format_table(result).splitlines()[0]
    write_csv(EvalResult.from_dict(data), tmp_path / "old.csv")
    assert next(csv.DictReader((tmp_path / "old.csv").open()))["protocol"] == "aligned"
    with pytest.raises(ConfigError, match="protocol"):
        evaluate([sift], dataset, ks=(256,), progress=False, protocol="warped")


def test_evaluate_checkpoint_warp(roadscene):
    cfg = DataConfig(dataset="roadscene", root=str(roadscene))
    result = evaluate_checkpoint("sift", cfg, "val", ks=(256,), max_pairs=1, warp=5)
    assert result.protocol == "warped:5" and len(result.pair_ids) == 1
    with pytest.raises(ConfigError, match="non-negative integer"):
        evaluate_checkpoint("sift", cfg, "val", ks=(256,), max_pairs=1, warp=-2)


# ----------------------------------------------------------------------------- CLI


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("bad", ["-1", "abc", "1.5", ""])
@pytest.mark.parametrize("command", ["eval", "match"])
def test_cli_bad_warp_is_one_line(command, bad, visible, roadscene, tmp_path, capsys):
    pair_id, _ = visible
    args = (
        ["--data", "roadscene", "--out", str(tmp_path / "o"), "--quiet"]
        if command == "eval"
        else [
            str(roadscene / "crop_LR_visible" / f"{pair_id}.jpg"),
            str(roadscene / "cropinfrared" / f"{pair_id}.jpg"),
            "--out",
            str(tmp_path / "m.png"),
        ]
    )
    code = main([command, "--checkpoint", "sift", *args, "--warp", bad])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("s2study: error: --warp must be a non-negative integer")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.png").exists()


def test_cli_eval_warp(tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--split", "val", "--max-pairs", "2", "--k", "256", "--warp", "0", "--quiet"]
    code = main(["eval", "--checkpoint", "sift", "--data", "roadscene", *flags, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "roadscene val (2 pairs), protocol warped:0" in printed
    assert read_json(out / "eval.json").protocol == "warped:0"
    assert len(list((out / "cache" / "warp-0").glob("*_b.png"))) == 2


def test_cli_match_warp(visible, roadscene, tmp_path, capsys):
    pair_id, image = visible
    a = roadscene / "crop_LR_visible" / f"{pair_id}.jpg"
    out = tmp_path / "m.png"
    # the visible image against itself, warped: the drawing shows correct (green) matches
    flags = ["--warp", "3", "--k", "300"]
    code = main(["match", "--checkpoint", "sift", str(a), str(a), *flags, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "NCM@3px=" in printed and "protocol warped:3" in printed
    ncm = int(printed.split("NCM@3px=")[1].split(",")[0])
    assert ncm > 50
    drawing = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert drawing.shape == (image.shape[0], 2 * image.shape[1], 3)
    # the right half is the warped image (black where W leaves the frame), not IMAGE_B itself
    border = (
        warp_module.warp_image(
            np.full(image.shape[:2], 255, np.uint8), draw_warp(3, pair_id, *image.shape[:2]).matrix
        )
        == 0
    )
    assert border.any() and np.median(drawing[:, image.shape[1] :][border]) == 0
    colours = {tuple(c) for c in drawing.reshape(-1, 3)}
    assert (0, 200, 0) in colours
    assert (
        main(["match", "--checkpoint", "sift", str(a), str(a), "--pair-id", "x", "--out", str(out)])
        == 2
    )
    assert "--pair-id" in _one_error_line(capsys.readouterr().err)
