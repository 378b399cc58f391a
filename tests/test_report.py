"""The study report's tables and the lambda curve, from evaluated trials as MLflow holds them."""

from __future__ import annotations

import cv2

from s2study.plots import plot_lambda_curves
from s2study.report import format_trials, lambda_curves, method_label, paper_tables


def trial(lam, method="r2d2", dataset="roadscene", ncm=(10.0, 20.0)):
    metrics = {"eval/nc_k1024": 100.0, "eval/nc_k2048": 200.0,
               "eval/ncm_3px_k1024": ncm[0], "eval/ncm_3px_k2048": ncm[1],
               "eval/cmr_3px_k1024": ncm[0], "eval/cmr_3px_k2048": ncm[1] / 2, "val_ncm": 99.0}
    return {"name": f"t{lam}", "method": method, "dataset": dataset, "lambda_ssl": lam, "metrics": metrics}


def test_method_labels_follow_the_paper():
    assert method_label("r2d2", 0.0) == "R2D2"
    assert method_label("d2net", 0.4) == "D2-Net+SSL (λ=0.4)"


def test_paper_tables_have_one_row_per_lambda_in_lambda_order():
    text = paper_tables([trial(0.8, ncm=(3.0, 4.0)), trial(0.0, ncm=(1.0, 2.0)), trial(0.4, ncm=(5.0, 6.0))])
    ncm = text.split("TABLE II")[1].split("TABLE III")[0].splitlines()
    rows = [line.split() for line in ncm if line.startswith("R2D2")]
    assert [r[0] for r in rows] == ["R2D2", "R2D2+SSL", "R2D2+SSL"]
    assert [r[-2:] for r in rows] == [["1.0", "2.0"], ["5.0", "6.0"], ["3.0", "4.0"]]


def test_lambda_curves_sort_by_lambda_per_series_and_k():
    evaluated = [trial(0.8, ncm=(3.0, 4.0)), trial(0.0, ncm=(1.0, 2.0)), trial(0.4, ncm=(5.0, 6.0)),
                 trial(0.4, method="d2net")]  # one D2-Net point: no curve
    curves = lambda_curves(evaluated)
    assert list(curves) == ["R2D2 RoadScene"]
    assert curves["R2D2 RoadScene"] == {1024: [(0.0, 1.0, None), (0.4, 5.0, None), (0.8, 3.0, None)],
                                        2048: [(0.0, 2.0, None), (0.4, 6.0, None), (0.8, 4.0, None)]}


def test_runs_at_one_lambda_give_one_point_with_its_mean_and_sample_std():
    curves = lambda_curves([trial(0.0, ncm=(1.0, 2.0)), trial(0.4, ncm=(4.0, 2.0)), trial(0.4, ncm=(6.0, 4.0)),
                            trial(0.4, ncm=(8.0, 6.0))])
    assert curves["R2D2 RoadScene"][1024] == [(0.0, 1.0, None), (0.4, 6.0, 2.0)]
    assert curves["R2D2 RoadScene"][2048] == [(0.0, 2.0, None), (0.4, 4.0, 2.0)]


def test_lambda_plot_is_a_png(tmp_path):
    path = plot_lambda_curves(lambda_curves([trial(0.0), trial(1.2, ncm=(30.0, 40.0)), trial(1.2, ncm=(20.0, 30.0))]),
                              tmp_path / "l.png", "t")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 200 and image.std() > 5


def test_trial_table_shows_small_values_in_significant_digits():
    text = format_trials([{"trial": "t1", "status": "finished", "epochs": 8, "best": 41.83, "lr": 2.04e-05,
                           "lambda_ssl": 0.0}], "val_ncm")
    assert "2.04e-05" in text and "41.83" in text and " 0.00" in text


def test_warped_evaluations_get_their_own_columns_beside_the_aligned_ones():
    aligned = trial(0.0, ncm=(1.0, 2.0))
    both = trial(0.4, ncm=(5.0, 6.0))
    both["metrics"].update({"eval/warped/ncm_3px_k1024": 3.0, "eval/warped/ncm_3px_k2048": 4.0})
    ncm = paper_tables([aligned, both]).split("TABLE II")[1].split("TABLE III")[0].splitlines()
    assert "RoadScene K=1024" in ncm[1] and "RoadScene warped K=2048" in ncm[1]
    rows = [line.split() for line in ncm if line.startswith("R2D2")]
    assert rows[0][-4:] == ["1.0", "2.0", "-", "-"] and rows[1][-4:] == ["5.0", "6.0", "3.0", "4.0"]
    # the lambda curve is drawn from the aligned protocol
    assert lambda_curves([aligned, both])["R2D2 RoadScene"][1024] == [(0.0, 1.0, None), (0.4, 5.0, None)]
