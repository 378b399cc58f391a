"""Multi-objective studies: the front, the values Optuna is told, the study file's checks."""

from __future__ import annotations

from pathlib import Path

import cv2
import optuna
import pytest

from s2study.errors import ConfigError
from s2study.plots import plot_pareto_front
from s2study.study.config import load_study
from s2study.study.optuna_store import prepare_study
from s2study.study.pareto import dominates, format_front, front_rows, pareto_front
from s2study.study.search import build_searcher

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
BOTH = ("metric=[val_ncm, val_cmr]", "mode=[max, min]")


def test_a_point_dominates_only_when_no_worse_anywhere_and_better_somewhere():
    assert dominates((2, 1), (1, 2), ("max", "min")) and not dominates((1, 2), (2, 1), ("max", "min"))
    assert not dominates((2, 3), (1, 1), ("max", "min"))  # better in one, worse in the other
    assert not dominates((1, 1), (1, 1), ("max", "max"))  # equal: neither


def test_the_front_holds_exactly_the_non_dominated_points():
    points = [(10, 5), (8, 9), (10, 4), (3, 9), (9, 9), None, (float("nan"), 99), (10, 9)]
    assert pareto_front(points, ("max", "max")) == [7]
    assert pareto_front(points[:5], ("max", "max")) == [0, 4]
    assert pareto_front(points[:5], ("max", "min")) == [2]  # (10, 4) beats every other there
    assert pareto_front([(3, 1), (10, 4), (8, 2)], ("max", "min")) == [0, 1, 2]
    rows = front_rows(list("abc"), [(3, 1), (10, 4), (8, 2)], [{"x": i} for i in range(3)],
                      (("val_ncm", "max"), ("val_cmr", "min")))
    assert [r["trial"] for r in rows] == ["b", "c", "a"] and rows[0] == {"trial": "b", "val_ncm": 10, "val_cmr": 4, "x": 1}
    assert "Pareto front over val_ncm (max), val_cmr (min)" in format_front(rows, (("val_ncm", "max"), ("val_cmr", "min")))


def test_pareto_plot_is_a_png(tmp_path):
    path = plot_pareto_front([(1.0, 2.0), (2.0, 1.0), (0.5, 0.5)], [0, 1], ("val_ncm", "val_cmr"), tmp_path / "p.png", "t")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 200 and image.std() > 5


def test_optuna_gets_every_objective_at_the_trials_best_epoch_by_the_first(tmp_path):
    cfg = load_study(SMOKE, [f"optuna.storage=sqlite:///{tmp_path / 'optuna.db'}", *BOTH], cwd=tmp_path)
    assert cfg.objectives == (("val_ncm", "max"), ("val_cmr", "min")) and cfg.metric == "val_ncm" and cfg.mode == "max"
    searcher = build_searcher(cfg, prepare_study(cfg, "/studies/smoke"))
    searcher.suggest("a")
    epochs = [(5.0, 30.0), (9.0, 50.0), (7.0, 10.0)]  # best val_ncm at epoch 2, whose val_cmr is 50
    for epoch, (ncm, cmr) in enumerate(epochs, 1):
        searcher.on_trial_result("a", {"val_ncm": ncm, "val_cmr": cmr, "training_iteration": epoch})
    searcher.on_trial_complete("a", {"val_ncm": 7.0, "val_cmr": 10.0, "training_iteration": 3})
    study = optuna.load_study(study_name="smoke", storage=cfg.optuna.storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.trials[0].values == [9.0, 50.0]


@pytest.mark.parametrize("overrides, message", [
    (("metric=[val_ncm, val_cmr]",), r"mode: 2 metric\(s\) \['val_ncm', 'val_cmr'\] need 2 mode\(s\)"),
    (("metric=[val_ncm, val_cmr]", "mode=[max]"), r"need 2 mode\(s\) .*got \['max'\]"),
    (("metric=[val_ncm, val_ncm]", "mode=[max, max]"), r"metric: \['val_ncm', 'val_ncm'\] names a metric twice"),
    (("metric=[val_ncm, val_cmrr]", "mode=[max, max]"), r"metric: unknown metric 'val_cmrr' \(did you mean 'val_cmr'\?\)"),
    (("metric=[]",), r"metric: an empty list"),
    ((*BOTH, "sampler.name=cmaes"), r"sampler.name: 'cmaes' optimises one metric, and metric lists 2"),
    (("objectives=[[val_ncm, max]]",), r"objectives: unknown key 'objectives'"),
])
def test_bad_metric_lists_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_study(SMOKE, list(overrides), cwd=tmp_path)


def test_the_nsga2_sampler_survives_the_pickling_tune_saves_it_with(tmp_path):
    import pickle

    from s2study.study.search import build_sampler

    cfg = load_study(SMOKE, [*BOTH, "sampler.name=nsga2", "sampler.n_startup_trials=null"], cwd=tmp_path)
    sampler = pickle.loads(pickle.dumps(build_sampler(cfg)))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    assert len(study.trials) == 3
