"""The study's searcher and budget on their own: the value Optuna learns from, its storage,
enqueued points, budgets.

Real OptunaSearch (``StudySearch``) and a real SQLite Optuna storage, driven the way Tune
drives a searcher (``suggest``, ``on_trial_result`` per epoch, ``on_trial_complete``); the end
to end checks on a real study are in ``tests/test_e2e_study.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from s2study.errors import ConfigError, EnvironmentProblem
from s2study.study.budget import BudgetWatch, Spent, parse_duration
from s2study.study.config import load_study
from s2study.study.optuna_store import prepare_study, safe_url, storage_url
from s2study.study.search import build_searcher

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"


def _study(tmp_path: Path, *overrides: str):
    return load_study(SMOKE, [f"optuna.storage=sqlite:///{tmp_path / 'optuna.db'}", *overrides], cwd=tmp_path)


def _epochs(searcher, trial_id: str, values: list[float]) -> None:
    for epoch, value in enumerate(values, 1):
        searcher.on_trial_result(trial_id, {"val_ncm": value, "training_iteration": epoch})
    searcher.on_trial_complete(trial_id, {"val_ncm": values[-1], "training_iteration": len(values)})


def test_optuna_is_told_each_trials_best_value_not_its_last(tmp_path):
    cfg = _study(tmp_path)
    searcher = build_searcher(cfg, prepare_study(cfg, "/studies/smoke"))
    for trial_id, values in (("a", [5.0, 9.0, 3.0]), ("b", [2.0, float("nan"), 4.0]), ("c", [7.0])):
        assert set(searcher.suggest(trial_id)) >= {"lambda_ssl", "ssl.rotation_deg"}
        _epochs(searcher, trial_id, values)
    stored = optuna.load_study(study_name="smoke", storage=cfg.optuna.storage)
    assert [t.value for t in stored.trials] == [9.0, 4.0, 7.0]
    assert stored.trials[0].intermediate_values == {1: 5.0, 2: 9.0, 3: 3.0}
    assert stored.user_attrs["s2study.storage"] == "/studies/smoke"


def test_the_epoch_tune_hands_only_to_on_trial_complete_counts_too(tmp_path):
    """When ASHA stops a trial (or it ends), Tune passes that epoch's result to
    ``on_trial_complete`` alone: it is an intermediate value, and may be the best."""
    cfg = _study(tmp_path)
    searcher = build_searcher(cfg, prepare_study(cfg, "/studies/smoke"))
    searcher.suggest("a")
    searcher.on_trial_result("a", {"val_ncm": 5.0, "training_iteration": 1})
    searcher.on_trial_complete("a", {"val_ncm": 12.0, "training_iteration": 2})
    (trial,) = optuna.load_study(study_name="smoke", storage=cfg.optuna.storage).trials
    assert trial.value == 12.0 and trial.intermediate_values == {1: 5.0, 2: 12.0}


def test_minimised_metric_keeps_the_lowest_value(tmp_path):
    cfg = _study(tmp_path, "metric=loss/total", "mode=min")
    searcher = build_searcher(cfg, prepare_study(cfg, "/studies/smoke"))
    searcher.suggest("a")
    for epoch, value in enumerate([3.0, 1.5, 2.0], 1):
        searcher.on_trial_result("a", {"loss/total": value, "training_iteration": epoch})
    searcher.on_trial_complete("a", {"loss/total": 2.0, "training_iteration": 3})
    (trial,) = optuna.load_study(study_name="smoke", storage=cfg.optuna.storage).trials
    assert trial.value == 1.5


def test_enqueued_configurations_are_suggested_first_with_exactly_their_values(tmp_path):
    cfg = _study(tmp_path, "enqueue=[{lambda_ssl: 0.4, ssl.rotation_deg: 30.0}, {lambda_ssl: 0.0}]")
    searcher = build_searcher(cfg, prepare_study(cfg, "/studies/smoke"))
    first, second, third = (searcher.suggest(t) for t in "abc")
    assert first == {"lambda_ssl": 0.4, "ssl.rotation_deg": 30.0}
    assert second["lambda_ssl"] == 0.0 and 0.0 <= second["ssl.rotation_deg"] <= 60.0  # the rest sampled
    assert third != first


def test_a_dead_attempts_optuna_study_is_replaced_and_another_experiments_refused(tmp_path):
    cfg = _study(tmp_path)
    searcher = build_searcher(cfg, prepare_study(cfg, "/studies/smoke"))
    searcher.suggest("a")
    _epochs(searcher, "a", [1.0])
    prepare_study(cfg, "/studies/smoke")  # the same experiment folder, which Ray could not resume
    assert optuna.load_study(study_name="smoke", storage=cfg.optuna.storage).trials == []
    with pytest.raises(ConfigError, match=r"optuna.storage: .* already holds an Optuna study 'smoke' .*"
                                          r"of /studies/smoke\); pick another study name"):
        prepare_study(cfg, "/elsewhere/smoke")


def test_default_storage_is_beside_a_local_study_and_memory_beside_a_remote_one(tmp_path):
    local = load_study(SMOKE, cwd=tmp_path)
    assert storage_url(local) == f"sqlite:///{tmp_path / 's2study_results' / 'smoke' / 'optuna.db'}"
    assert storage_url(local, storage_filesystem=object()) == "memory"  # a custom filesystem: not this disk
    remote = load_study(SMOKE, ["storage=s3://bucket/studies"], cwd=tmp_path)
    assert storage_url(remote) == "memory"
    relative = load_study(SMOKE, ["optuna.storage=sqlite:///o.db"], cwd=tmp_path)
    assert storage_url(relative) == f"sqlite:///{tmp_path / 'o.db'}"
    assert isinstance(prepare_study(remote, "s3://bucket/studies/smoke"), optuna.storages.InMemoryStorage)


@pytest.mark.parametrize("override, message", [
    ("enqueue=[{lambda_ssl: 2.0}]", r"enqueue\[0\].lambda_ssl: 2.0 is outside \[0, 1.2\]"),
    ("enqueue=[{lamda_ssl: 0.4}]", (r"enqueue\[0\].lamda_ssl: unknown sampled space key 'lamda_ssl' "
                                   r"\(did you mean 'lambda_ssl'\?\)")),
    ("enqueue=[{lambda_ssl: high}]", r"enqueue\[0\].lambda_ssl: 'high' is not a number"),
    ("enqueue=[0.4]", r"enqueue\[0\]: 0.4 is not allowed; expected a mapping"),
    ("enqueue=lambda", r"enqueue: 'lambda' is not allowed; expected a list of mappings"),
    ("optuna.storage=redis://host", r"optuna.storage: 'redis://host' is not allowed; use memory or a database URL"),
    ("optuna.storage='sqlite:///:memory:'", r"optuna.storage: 'sqlite:///:memory:' is not allowed; use a file"),
    ("optuna.store=memory", r"optuna.store: unknown key 'store' \(did you mean 'storage'\?\)"),
])
def test_bad_enqueue_and_storage_are_refused_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_study(SMOKE, [override], cwd=tmp_path)


def test_an_unreachable_database_is_one_line_before_ray_starts(tmp_path):
    url = "postgresql://s2study:secret@127.0.0.1:9/optuna"
    with pytest.raises(EnvironmentProblem, match=r"optuna.storage: cannot open postgresql://s2study:\*\*\*@127.0.0.1:9"):
        prepare_study(load_study(SMOKE, [f"optuna.storage={url}"], cwd=tmp_path), "/studies/smoke")
    assert safe_url(url) == "postgresql://s2study:***@127.0.0.1:9/optuna"
    proc = subprocess.run(
        [sys.executable, "-m", "s2study", "run", str(SMOKE), "--set", f"optuna.storage={url}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s2study: error: optuna.storage: cannot open"), proc.stderr
    assert "secret" not in proc.stderr


def test_a_restored_searcher_fails_the_trials_asked_after_its_saved_state(tmp_path):
    """A driver killed after Tune's last snapshot: the trials asked since then are lost to Tune."""
    cfg = _study(tmp_path)
    searcher = build_searcher(cfg, prepare_study(cfg, "/studies/smoke"))
    searcher.suggest("a")
    _epochs(searcher, "a", [3.0])
    searcher.suggest("b")  # running at the snapshot: Tune resumes it
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("c")  # asked after it, then the driver died

    restored = build_searcher(cfg, None)
    restored.restore(str(tmp_path / "searcher.pkl"))
    _epochs(restored, "b", [1.0, 2.0])
    states = [t.state.name for t in optuna.load_study(study_name="smoke", storage=cfg.optuna.storage).trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]


@pytest.mark.parametrize("text, seconds", [("8h", 28800), ("90m", 5400), ("1h30m", 5400), ("2d", 172800),
                                           ("3600s", 3600), (45, 45), ("1.5h", 5400), ("1H 30M", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("override, message", [
    ("budget.wall='8 hours'", r"budget.wall: '8 hours' cannot be parsed as a duration; use e.g. 90m, 8h"),
    ("budget.wall=0", r"budget.wall: 0 is not a positive duration"),
    ("budget.gpu_hours=-1", r"budget.gpu_hours: must be > 0, got -1"),
    ("budget.gpu_hours=4", r"budget.gpu_hours: 4, but the trials use no GPU \(resources.gpu: 0\)"),
    ("budget.gpus=4", r"budget.gpus: unknown key 'gpus' \(did you mean 'gpu_hours'\?\)"),
])
def test_bad_budgets_are_refused_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_study(SMOKE, [override], cwd=tmp_path)


def test_budget_watch_counts_wall_time_over_attempts_and_gpu_time_by_share():
    earlier = Spent.from_state({"budget_spent": {"wall_s": 50.0, "gpu_s": 7000.0}})
    watch = BudgetWatch(60.0, 7200.0, 0.5, earlier)
    assert watch.exhausted() is None
    watch.on_trial_result(1, [], None, {"time_this_iter_s": 300.0})  # 300 s on half a GPU
    assert watch.spent.gpu_s == 7150.0 and watch.exhausted() is None
    watch.on_trial_result(2, [], None, {"time_this_iter_s": 200.0})
    assert watch.exhausted() == "GPU budget of 2 GPU hours spent (2.01 GPU hours)"
    wall = BudgetWatch(60.0, None, 0.0, Spent(wall_s=59.99))
    wall.start()
    time.sleep(0.05)
    wall.stop()
    assert wall.exhausted() == "wall budget of 60 s spent (60 s)" and wall.spent.as_state()["wall_s"] >= 60


def test_a_warm_start_from_a_study_that_does_not_exist_is_refused_listing_those_that_do(tmp_path):
    cfg = _study(tmp_path, "warm_start.study=nope", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"smoke.yaml: warm_start.study: no study 'nope' in sqlite:///.*mlflow.db; "
                                          r"studies there: \(none\)"):
        prepare_study(cfg, "/studies/smoke")
    with pytest.raises(ConfigError, match=r"warm_start.study: missing; name the earlier study"):
        _study(tmp_path, "warm_start.tracking=sqlite:///x.db")


def test_a_trial_that_finished_after_the_saved_state_is_rerun_without_touching_its_optuna_trial(tmp_path):
    """Tune reruns (from its checkpoint) a trial that ended after its last snapshot; the
    Optuna storage already holds it finished, with the value it first ended with."""
    cfg = _study(tmp_path)
    searcher = build_searcher(cfg, prepare_study(cfg, "/studies/smoke"))
    searcher.suggest("a")
    searcher.on_trial_result("a", {"val_ncm": 4.0, "training_iteration": 1})
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.on_trial_complete("a", {"val_ncm": 6.0, "training_iteration": 2})  # then the driver died

    restored = build_searcher(cfg, None)
    restored.restore(str(tmp_path / "searcher.pkl"))
    _epochs(restored, "a", [4.0, 5.0])  # rerun from its epoch-1 checkpoint: no error
    (trial,) = optuna.load_study(study_name="smoke", storage=cfg.optuna.storage).trials
    assert trial.state.name == "COMPLETE" and trial.value == 6.0
