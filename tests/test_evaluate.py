"""Evaluation on real RoadScene pairs with the SIFT baseline: numbers, cache, writers, CLI."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from s2study.cli import main
from s2study.config.schema import DataConfig
from s2study.data.datasets import open_dataset
from s2study.errors import ConfigError
from s2study.evaluate import (
    EvalResult,
    evaluate,
    format_table,
    parse_data_spec,
    read_json,
    to_keypoints,
)
from s2study.extractor import load_extractor
from s2study.geometry import identity_flow
from s2study.metrics import pair_metrics
from s2study.plots import draw_matches

KS = (256, 1024)


class CountingExtractor:
    """The real SIFT extractor, counting how often it runs (to observe the cache)."""

    def __init__(self) -> None:
        self.inner = load_extractor("sift")
        self.name, self.cache_key = self.inner.name, self.inner.cache_key
        self.calls = 0

    def __call__(self, image, max_keypoints=4096):
        self.calls += 1
        return self.inner(image, max_keypoints)


@pytest.fixture(scope="module")
def val_pairs(roadscene):
    return open_dataset(DataConfig(dataset="roadscene", root=str(roadscene)), "val")


@pytest.fixture(scope="module")
def sift_run(val_pairs, tmp_path_factory):
    """Two real val pairs evaluated once with a cache; the second run must extract nothing."""
    tmp = tmp_path_factory.mktemp("eval")
    extractor = CountingExtractor()
    kwargs = {
        "ks": KS,
        "cache_dir": tmp / "cache",
        "progress": False,
        "max_pairs": 2,
        "dataset_name": "roadscene",
        "split": "val",
    }
    first = evaluate([extractor], val_pairs, out_dir=tmp / "out", **kwargs)
    calls_first = extractor.calls
    second = evaluate([extractor], val_pairs, **kwargs)
    return first, second, calls_first, extractor.calls - calls_first, tmp


def test_sift_numbers_are_sane(sift_run):
    result, _, _, _, _ = sift_run
    assert result.methods == ["sift"] and result.ks == KS and len(result.pair_ids) == 2
    for k in KS:
        mean = result.means["sift"][k]
        assert mean.num_pairs == 2
        assert mean.nc > 0
        assert 0 <= mean.ncm <= mean.nc
        assert 0 <= mean.cmr <= 100 and 0 <= mean.repeatability <= 100
        for p in result.pairs["sift"][k]:
            assert list(p.ncm_curve) == sorted(p.ncm_curve)  # monotone in the threshold
            assert list(p.cmr_curve) == sorted(p.cmr_curve)
            assert p.num_a <= k and p.num_b <= k
    assert result.means["sift"][1024].nc > result.means["sift"][256].nc


def test_cache_is_reused(sift_run):
    first, second, calls_first, calls_second, tmp = sift_run
    assert calls_first == 4  # 2 pairs x 2 images, once each at the largest K
    assert calls_second == 0
    assert len(list((tmp / "cache").rglob("*.npz"))) == 4
    assert second.to_dict()["methods"] == first.to_dict()["methods"]


def test_slicing_equals_extracting_at_each_k(sift_run, val_pairs):
    result, _, _, _, _ = sift_run
    sample = val_pairs[0]
    flow, valid = identity_flow(*sample.image_a.shape[:2])
    sift = load_extractor("sift")
    k = KS[0]
    direct = pair_metrics(
        to_keypoints(sift(sample.image_a, k)), to_keypoints(sift(sample.image_b, k)), flow, valid, k
    )
    assert direct == result.pairs["sift"][k][0]


def test_writers(sift_run):
    result, _, _, _, tmp = sift_run
    out = tmp / "out"
    for name in ("eval.json", "eval.csv", "cmr_curve.png", "ncm_curve.png"):
        assert (out / name).stat().st_size > 0
    image = cv2.imread(str(out / "cmr_curve.png"))
    assert image is not None and image.shape[1] > image.shape[0]  # one panel per K, side by side
    loaded = read_json(out / "eval.json")
    assert isinstance(loaded, EvalResult)
    assert json.loads(json.dumps(loaded.to_dict())) == json.loads((out / "eval.json").read_text())
    assert loaded.metrics("sift") == pytest.approx(result.metrics("sift"))
    rows = list(csv.DictReader((out / "eval.csv").open()))
    assert [(r["method"], int(r["k"])) for r in rows] == [("sift", k) for k in KS]
    assert float(rows[0]["cmr@3px"]) == pytest.approx(result.means["sift"][KS[0]].cmr, abs=1e-3)
    table = format_table(result)
    assert "NC" in table and "NCM@3px" in table and "CMR (%)" in table
    assert table.count("K=1024") == 3  # one column per block
    assert "sift" in table.splitlines()[-1]


def test_bad_arguments(val_pairs):
    sift = load_extractor("sift")
    with pytest.raises(ConfigError, match="positive integers"):
        evaluate([sift], val_pairs, ks=(0, 1024), progress=False)
    with pytest.raises(ConfigError, match="thresholds must be > 0"):
        evaluate([sift], val_pairs, main_threshold=0, progress=False)
    with pytest.raises(ConfigError, match="no extractor"):
        evaluate([], val_pairs, progress=False)
    with pytest.raises(ConfigError, match="DATASET:ROOT"):
        parse_data_spec("roadscene:")
    assert parse_data_spec("roadscene") == DataConfig(dataset="roadscene")


# ----------------------------------------------------------------------------- CLI


def test_cli_eval_writes_everything(tmp_path, capsys):
    code = main(
        [
            "eval",
            "--checkpoint",
            "sift",
            "--data",
            "roadscene",
            "--max-pairs",
            "2",
            "--k",
            "512",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    for name in ("eval.json", "eval.csv", "cmr_curve.png", "ncm_curve.png"):
        assert (tmp_path / name).is_file()
    out = capsys.readouterr().out
    assert "roadscene val (2 pairs)" in out and "K=512" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "nosuch"], "unknown dataset 'nosuch'"),
        (["--data", "roadscene:/nonexistent/RoadScene"], "/nonexistent/RoadScene"),
        (["--data", "roadscene:"], "expected DATASET or DATASET:ROOT"),
        (["--data", "roadscene", "--k", "0"], "positive integers"),
        (["--data", "roadscene", "--threshold", "-1"], "thresholds must be > 0"),
        (["--data", "roadscene", "--split", "nosplit"], "nosplit"),
    ],
)
def test_cli_eval_bad_input_exits_2(args, message, tmp_path, capsys):
    code = main(["eval", "--checkpoint", "sift", "--out", str(tmp_path), "--quiet", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_eval_unknown_checkpoint_lists_baselines(tmp_path, capsys):
    code = main(
        ["eval", "--checkpoint", "no_such.pt", "--data", "roadscene", "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint file at" in err and "sift" in err


def test_cli_match_with_ground_truth(roadscene, tmp_path, capsys):
    pair_id = (roadscene / "splits" / "val.txt").read_text().split()[0]
    a = roadscene / "crop_LR_visible" / f"{pair_id}.jpg"
    b = roadscene / "cropinfrared" / f"{pair_id}.jpg"
    np.savetxt(tmp_path / "H.txt", np.eye(3))
    out = tmp_path / "m.png"
    code = main(
        [
            "match",
            "--checkpoint",
            "sift",
            str(a),
            str(b),
            "--gt",
            str(tmp_path / "H.txt"),
            "--k",
            "512",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "NC=" in printed and "NCM@3px=" in printed
    drawing = cv2.imread(str(out))
    assert drawing.shape[1] == 2 * cv2.imread(str(a)).shape[1]
    np.save(tmp_path / "bad.npy", np.zeros((2, 2)))
    assert (
        main(
            [
                "match",
                "--checkpoint",
                "sift",
                str(a),
                str(b),
                "--gt",
                str(tmp_path / "bad.npy"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "bad.npy" in capsys.readouterr().err


def test_cli_extract_writes_npz(roadscene, tmp_path):
    pair_id = (roadscene / "splits" / "val.txt").read_text().split()[0]
    images = [
        roadscene / "crop_LR_visible" / f"{pair_id}.jpg",
        roadscene / "cropinfrared" / f"{pair_id}.jpg",
    ]
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                "sift",
                str(images[0]),
                "--out",
                str(tmp_path / "f"),
                "--k",
                "300",
            ]
        )
        == 0
    )
    with np.load(tmp_path / "f" / f"{pair_id}.npz") as data:
        kp, scores, desc = data["keypoints"], data["scores"], data["descriptors"]
    assert kp.shape == (300, 2) and scores.shape == (300,) and desc.shape == (300, 128)
    assert np.all(np.diff(scores) <= 0)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-5)
    # two inputs with the same stem would overwrite each other
    assert (
        main(["extract", "--checkpoint", "sift", *map(str, images), "--out", str(tmp_path / "g")])
        == 2
    )


# ----------------------------------------------------------------------------- drawing


def test_draw_matches_colours(tmp_path):
    a = np.full((40, 60, 3), 90, np.uint8)
    b = np.full((30, 50), 90, np.uint8)
    kp_a = np.array([[5.0, 5.0], [30.0, 30.0], [50.0, 10.0]])
    kp_b = np.array([[5.0, 5.0], [40.0, 20.0], [10.0, 25.0]])
    matches = np.array([[0, 0], [1, 1], [2, 2]])
    canvas = draw_matches(
        a,
        b,
        kp_a,
        kp_b,
        matches,
        np.array([True, False, False]),
        tmp_path / "d.png",
        known_mask=np.array([True, True, False]),
    )
    assert canvas.shape == (40, 110, 3)
    colours = {tuple(c) for c in canvas.reshape(-1, 3)}
    assert {(0, 200, 0), (230, 0, 0), (240, 200, 0)} <= colours
    assert cv2.imread(str(tmp_path / "d.png")).shape == (40, 110, 3)
    plain = draw_matches(a, b, kp_a, kp_b, matches, None, None)
    assert (240, 200, 0) in {tuple(c) for c in plain.reshape(-1, 3)}
