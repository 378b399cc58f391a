"""MLflow tracking of studies: URIs, the parent/child run layout, reopening without duplicates.

The run-layout tests use a real sqlite MLflow store in a temporary folder (creating its
schema takes seconds, hence one store per module and the ``slow`` marker).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from s2study.errors import ConfigError, EnvironmentProblem
from s2study.study import tracking


def test_default_and_relative_sqlite_uris_become_absolute(tmp_path):
    assert tracking.normalize_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.normalize_tracking_uri("sqlite:///sub/m.db", tmp_path) == f"sqlite:///{tmp_path / 'sub/m.db'}"
    assert tracking.normalize_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert tracking.sqlite_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    for uri in ("http://10.0.0.5:5000", "https://mlflow.example.org", "postgresql+psycopg2://u@h/db"):
        assert tracking.normalize_tracking_uri(uri, tmp_path) == uri


@pytest.mark.parametrize("uri, message", [
    ("./mlruns", "file store"),
    ("file:///tmp/mlruns", "file store"),
    ("sqlite://", "sqlite:///path/to/mlflow.db"),
    ("sqlite:///:memory:", "sqlite:///path/to/mlflow.db"),
    ("ftp://host/x", "unknown scheme 'ftp'"),
])
def test_unusable_tracking_uris_are_config_errors(tmp_path, uri, message):
    with pytest.raises(ConfigError, match=message):
        tracking.normalize_tracking_uri(uri, tmp_path)


def test_metric_keys_are_made_mlflow_legal():
    assert tracking.metric_key("eval/ncm@3px_k1024") == "eval/ncm_3px_k1024"
    assert tracking.metric_key("loss/ssl_vis") == "loss/ssl_vis"
    assert tracking.metric_key("eval/cmr@2.5px_k2048") == "eval/cmr_2.5px_k2048"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(EnvironmentProblem, match="not reachable"):
        tracking.check_tracking_reachable(f"http://127.0.0.1:{_closed_port()}", timeout=2.0)
    assert time.perf_counter() - t0 < 3.0


def test_sqlite_folder_must_exist(tmp_path):
    with pytest.raises(EnvironmentProblem, match="does not exist"):
        tracking.check_tracking_reachable(f"sqlite:///{tmp_path}/missing/mlflow.db")
    tracking.check_tracking_reachable(f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh sqlite store with one experiment and one study run."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "unit-study")
    parent = tracking.start_study_run(uri, exp, "unit-study", {"study.trials": 6, "base.lambda_ssl": 0.4},
                                      tags={"s2study.metric": "val_ncm", "s2study.mode": "max"})
    return uri, exp, parent, folder


def _open(store, trial_id, run_id=None):
    uri, exp, parent, _ = store
    return tracking.TrialRun.open(uri, exp, parent, trial_id, f"run_trial_{trial_id}",
                                  params={"lambda_ssl": 0.3, "method.name": "r2d2"},
                                  metric="val_ncm", mode="max", run_id=run_id)


@pytest.mark.slow
def test_experiment_artifacts_live_beside_the_database(store):
    uri, exp, _, folder = store
    assert tracking.ensure_experiment(uri, "unit-study") == exp
    location = tracking.client(uri).get_experiment(exp).artifact_location
    assert location == (folder / "mlartifacts" / "unit-study").as_uri()


@pytest.mark.slow
def test_trial_run_is_a_tagged_child_with_epoch_steps(store, tmp_path):
    uri, _, parent, _ = store
    run = _open(store, "aaaa_00000")
    improved = [run.log_epoch({"epoch": e, "val_ncm": v, "loss/total": 1.0 / e}, e)
                for e, v in ((1, 10.0), (2, 14.0), (3, 12.0))]
    assert improved == [True, True, False]
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    run.log_artifact(ckpt, "checkpoints")
    run.finish("stopped_early")

    c = tracking.client(uri)
    info = c.get_run(run.run_id)
    assert info.data.tags["mlflow.parentRunId"] == parent
    assert info.data.tags["s2study.trial_id"] == "aaaa_00000"
    assert info.data.tags["s2study.status"] == "stopped_early"
    assert info.info.status == "FINISHED" and info.info.run_name == "run_trial_aaaa_00000"
    assert info.data.params == {"lambda_ssl": "0.3", "method.name": "r2d2"}
    assert [m.step for m in c.get_metric_history(run.run_id, "val_ncm")] == [1, 2, 3]
    assert [m.value for m in c.get_metric_history(run.run_id, "best_val_ncm")] == [10.0, 14.0, 14.0]
    assert [a.path for a in c.list_artifacts(run.run_id, "checkpoints")] == ["checkpoints/best.pt"]


@pytest.mark.slow
def test_reopened_trial_run_skips_logged_epochs(store):
    uri, *_ = store
    first = _open(store, "bbbb_00001")
    for e in (1, 2):
        first.log_epoch({"epoch": e, "val_ncm": 5.0 * e}, e)
    first.finish("failed", "RuntimeError: worker died")
    assert tracking.client(uri).get_run(first.run_id).info.status == "FAILED"

    # a retry without a checkpoint finds the run by its trial-id tag; one from epoch 1's checkpoint
    by_tag = _open(store, "bbbb_00001")
    by_id = _open(store, "bbbb_00001", run_id=first.run_id)
    assert by_tag.run_id == by_id.run_id == first.run_id
    assert (by_id.last_step, by_id.best) == (2, 10.0)
    assert tracking.client(uri).get_run(first.run_id).info.status == "RUNNING"
    assert by_id.log_epoch({"epoch": 2, "val_ncm": 99.0}, 2) is False  # redone epoch: not logged again
    assert by_id.log_epoch({"epoch": 3, "val_ncm": 11.0}, 3) is True
    by_id.finish("finished")
    history = tracking.client(uri).get_metric_history(first.run_id, "val_ncm")
    assert [(m.step, m.value) for m in history] == [(1, 5.0), (2, 10.0), (3, 11.0)]


@pytest.mark.slow
def test_running_children_are_closed_and_study_reads_back(store):
    uri, exp, parent, _ = store
    left = _open(store, "cccc_00002")
    assert tracking.close_running_children(uri, exp, parent, "killed", "driver died") == 1
    run = tracking.client(uri).get_run(left.run_id)
    assert run.info.status == "KILLED" and run.data.tags["s2study.failure_reason"] == "driver died"

    by_name = tracking.fetch_study(uri, "unit-study")
    by_id = tracking.fetch_study(uri, parent)
    assert by_name.parent.run_id == by_id.parent.run_id == parent
    assert by_name.experiment == "unit-study"
    assert "killed" in {t.s2status for t in by_name.trials}
    with pytest.raises(ConfigError, match=r"no study 'unit-stduy'.*unit-study"):
        tracking.fetch_study(uri, "unit-stduy")


@pytest.mark.slow
def test_settle_ends_runs_left_running_with_the_status_tune_reports(store):
    uri, exp, parent, _ = store
    ended, lost = _open(store, "dddd_00003"), _open(store, "eeee_00004")
    t0 = time.perf_counter()
    n = tracking.settle_trial_runs(uri, exp, parent, {"dddd_00003": ("stopped_early", None)}, wait_s=1.0)
    assert n >= 2 and time.perf_counter() - t0 < 10
    c = tracking.client(uri)
    assert (c.get_run(ended.run_id).info.status, c.get_run(ended.run_id).data.tags["s2study.status"]) == (
        "FINISHED", "stopped_early")
    assert (c.get_run(lost.run_id).info.status, c.get_run(lost.run_id).data.tags["s2study.status"]) == (
        "KILLED", "killed")


@pytest.mark.slow
def test_runs_of_trials_tune_never_recorded_are_dropped(store):
    uri, exp, _, _ = store
    parent = tracking.start_study_run(uri, exp, "unit-study", {})
    kept, lost = (tracking.TrialRun.open(uri, exp, parent, tid, tid, {}, "val_ncm", "max")
                  for tid in ("gggg_00000", "gggg_00001"))
    assert tracking.drop_orphan_runs(uri, exp, parent, {"gggg_00000"}) == 1
    assert [r.info.run_id for r in tracking.child_runs(uri, exp, parent)] == [kept.run_id]
    deleted = tracking.client(uri).get_run(lost.run_id)
    assert deleted.info.lifecycle_stage == "deleted" and deleted.info.status == "KILLED"
