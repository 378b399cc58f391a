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



@pytest.mark.slow
def test_running_child_runs_are_the_study_runs_still_running(store):
    uri, exp, _, _ = store
    parent, other = (tracking.start_study_run(uri, exp, "unit-study", {}) for _ in range(2))
    ended, left = (tracking.TrialRun.open(uri, exp, parent, tid, tid, {}, "val_ncm", "max")
                   for tid in ("hhhh_00000", "hhhh_00001"))
    elsewhere = tracking.TrialRun.open(uri, exp, other, "hhhh_00002", "hhhh_00002", {}, "val_ncm", "max")
    ended.finish("finished")
    every = tracking.child_runs(uri, exp, parent)
    running = tracking.running_child_runs(uri, exp, parent)
    assert [r.info.run_id for r in running] == [left.run_id]
    assert [r.info.run_id for r in running] == [r.info.run_id for r in every if r.info.status == "RUNNING"]
    assert [r.info.run_id for r in tracking.running_child_runs(uri, exp, other)] == [elsewhere.run_id]
    assert tracking.close_running_children(uri, exp, parent, "killed", "study ended") == 1
    assert tracking.running_child_runs(uri, exp, parent) == []
    assert {r.info.status for r in tracking.child_runs(uri, exp, parent)} == {"FINISHED", "KILLED"}

# ----------------------------------------------------------------------------- outages


def _refused() -> Exception:
    """What MLflow's client raises for a server that is down (measured: its message and chain)."""
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as exc:
            raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed "
                                  "with exception ... Max retries exceeded") from exc
    except MlflowException as exc:
        return exc


def test_transient_failures_are_told_from_lasting_ones():
    from mlflow.exceptions import MlflowException, RestException

    assert tracking.transient(_refused())
    assert tracking.transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "db down"}))
    assert tracking.transient(MlflowException("API request to endpoint /x failed with error code 502 != 200. "
                                              "Response body: 'Bad Gateway'", error_code=1))
    assert not tracking.transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))
    assert not tracking.transient(MlflowException("a client-side problem"))
    assert not tracking.transient(ValueError("x"))
    assert not tracking.transient(tracking.TrackingUnavailable("gone for good"))


def test_retry_backs_off_then_succeeds_and_gives_up_after_the_limit():
    now, sleeps = [0.0], []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    calls = []

    def flaky():
        calls.append(now[0])
        if len(calls) < 5:
            raise _refused()
        return "ok"

    assert tracking.retry(flaky, "test", "http://x", limit_s=60, sleep=sleep, clock=lambda: now[0]) == "ok"
    assert sleeps == [0.5, 1.0, 2.0, 4.0]

    def down():
        raise _refused()

    sleeps.clear()
    with pytest.raises(tracking.TrackingUnavailable, match=r"did not answer for 60 s \(test\)"):
        tracking.retry(down, "test", "http://x", limit_s=60, sleep=sleep, clock=lambda: now[0])
    assert max(sleeps) == 10.0 and sum(sleeps) == pytest.approx(60.0)

    with pytest.raises(ValueError):  # not transient: no retry
        tracking.retry(lambda: (_ for _ in ()).throw(ValueError("bad")), "test", "http://x")


class _Server:
    """A fake store that can be taken down: records the writes it accepted, in order."""

    def __init__(self) -> None:
        self.up, self.accepted, self.refused = True, [], 0

    def write(self, item):
        def op():
            if not self.up:
                self.refused += 1
                raise _refused()
            self.accepted.append(item)
        return op


def test_write_queue_does_not_block_during_an_outage_and_flushes_in_order(monkeypatch):
    monkeypatch.setattr(tracking, "_BACKOFF_MAX_S", 0.2)
    server = _Server()
    q = tracking.WriteQueue("http://x", "r" * 32)
    q.put("w0", server.write(0), wait_s=5.0)
    assert server.accepted == [0]  # write-through while the store answers
    server.up = False
    t0 = time.perf_counter()
    for i in range(1, 20):
        q.put(f"w{i}", server.write(i), wait_s=5.0)
    assert time.perf_counter() - t0 < 7.0  # waited once (until the first refusal), not per write
    assert q.failing and q.pending == 19
    time.sleep(1.0)
    server.up = True
    q.flush(timeout=30)
    assert server.accepted == list(range(20)) and server.refused >= 2 and q.pending == 0


def test_write_queue_gives_up_after_the_outage_limit_and_says_so():
    server = _Server()
    server.up = False
    q = tracking.WriteQueue("http://x", "r" * 32, limit_s=0.5)
    q.put("epoch 1 metrics", server.write(1))
    q.put("epoch 2 metrics", server.write(2))
    with pytest.raises(tracking.TrackingUnavailable, match=r"2 write\(s\) of run r+ are lost: epoch 1 metrics"):
        q.flush(timeout=30)
    with pytest.raises(tracking.TrackingUnavailable):
        q.put("epoch 3 metrics", server.write(3))
    assert server.accepted == []


def test_a_write_that_fails_for_good_is_raised_by_the_next_call():
    q = tracking.WriteQueue("http://x", "r" * 32)
    done = []
    q.put("bad", lambda: (_ for _ in ()).throw(ValueError("param changed")))
    q.put("good", lambda: done.append(1))
    assert q.wait(timeout=10) and done == [1]  # later writes still land
    with pytest.raises(ValueError, match="param changed"):
        q.put("next", lambda: None)


@pytest.mark.slow
def test_trial_run_writes_survive_an_outage_once_each(store, monkeypatch, tmp_path):
    """The real sqlite store behind a client whose log_batch and artifact uploads fail (as
    during an outage) until the store is 'back': every epoch lands once, in order, and the
    run ends after them."""
    uri, *_ = store
    monkeypatch.setattr(tracking, "_BACKOFF_MAX_S", 0.2)
    run = _open(store, "ffff_00005")
    c = tracking.client(uri)
    down = {"on": True}
    for name in ("log_batch", "log_artifact", "set_terminated"):
        real = getattr(c, name)

        def failing(*args, _real=real, **kwargs):
            if down["on"]:
                raise _refused()
            return _real(*args, **kwargs)

        monkeypatch.setattr(c, name, failing)
    ckpt = tmp_path / "best.pt"
    t0, t0_wall = time.perf_counter(), time.time() - 1
    for e in (1, 2, 3):
        ckpt.write_bytes(f"weights of epoch {e}".encode())
        if run.log_epoch({"epoch": e, "val_ncm": float(e)}, e):
            run.log_artifact(ckpt, "checkpoints")
    assert time.perf_counter() - t0 < tracking.WRITE_THROUGH_S + 3  # training went on
    assert c.get_run(run.run_id).info.status == "RUNNING" and run.writes.pending > 0
    ckpt.unlink()  # the trial's folder may be gone before its queue drains (a stopped trial)
    finisher = __import__("threading").Thread(target=run.finish, args=("finished",))
    finisher.start()
    time.sleep(1.0)
    assert finisher.is_alive()  # finish waits for the queue
    down["on"] = False
    finisher.join(timeout=60)
    assert not finisher.is_alive()
    info = c.get_run(run.run_id)
    assert info.info.status == "FINISHED" and info.data.tags["s2study.status"] == "finished"
    assert [(m.step, m.value) for m in c.get_metric_history(run.run_id, "val_ncm")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    got = Path(c.download_artifacts(run.run_id, "checkpoints/best.pt", str(tmp_path / "dl")))
    assert got.read_bytes() == b"weights of epoch 3"
    import tempfile

    assert not [p for p in Path(tempfile.gettempdir()).glob("s2study-upload-*")
                if p.stat().st_mtime >= t0_wall]  # the snapshots are gone after upload


@pytest.mark.slow
def test_backfill_logs_the_epochs_a_checkpoint_has_and_the_run_lacks(store):
    uri, *_ = store
    run = _open(store, "hhhh_00006")
    run.log_epoch({"epoch": 1, "val_ncm": 3.0}, 1)
    reopened = _open(store, "hhhh_00006", run_id=run.run_id)
    history = [{"epoch": float(e), "val_ncm": v, "loss/total": 1.0} for e, v in ((1, 3.0), (2, 5.0), (3, 4.0))]
    assert reopened.backfill(history) is True
    assert reopened.backfill(history) is False  # nothing left to add
    reopened.finish("finished")
    c = tracking.client(uri)
    assert [(m.step, m.value) for m in c.get_metric_history(run.run_id, "val_ncm")] == [(1, 3.0), (2, 5.0), (3, 4.0)]
    assert [m.value for m in c.get_metric_history(run.run_id, "best_val_ncm")] == [3.0, 5.0, 5.0]


@pytest.mark.slow
def test_study_run_is_found_by_its_name_and_storage_not_its_address(store):
    uri, exp, _, _ = store
    first = tracking.start_study_run(uri, exp, "found", {}, tags={tracking.TAG_STORAGE: "s3://b/studies/found"})
    second = tracking.start_study_run(uri, exp, "found", {}, tags={tracking.TAG_STORAGE: "s3://b/studies/found"})
    tracking.set_tags(uri, second, {tracking.TAG_SUPERSEDED: "x"})
    assert tracking.find_study_run(uri, "unit-study", "found", "s3://b/studies/found") == first
    assert tracking.find_study_run(uri, "unit-study", "found", "s3://b/studies/found", prefer=second) == second
    assert tracking.find_study_run(uri, "unit-study", "found", "s3://b/other/found") is None
    assert tracking.find_study_run(uri, "no-such-experiment", "found", "s3://b/studies/found") is None
    assert tracking.missing_runs(uri, [first, "0" * 32]) == ["0" * 32]


@pytest.mark.slow
def test_the_driver_completes_a_run_from_its_trials_checkpoint(store, tmp_path):
    """A trial Tune stopped lets go of its run at once; when its process is killed with writes
    queued, the driver logs the epochs its Tune checkpoint holds (and its best weights)."""
    import torch
    from ray.tune import Checkpoint

    from s2study.checkpoint import save_checkpoint
    from s2study.study.runner import complete_from_checkpoint

    uri, *_ = store
    run = _open(store, "iiii_00007")
    run.log_epoch({"epoch": 1.0, "val_ncm": 4.0}, 1)
    run.flush()
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    history = [{"epoch": 1.0, "val_ncm": 4.0, "loss/total": 2.0}, {"epoch": 2.0, "val_ncm": 6.0, "loss/total": 1.5}]
    payload = {"method": {"name": "r2d2", "params": {}}, "model": {"w": torch.zeros(2)}, "epoch": 2, "history": history}
    save_checkpoint(folder / "checkpoint.pt", payload)
    save_checkpoint(folder / "best.pt", payload)
    assert complete_from_checkpoint(uri, run.run_id, Checkpoint.from_directory(folder), "val_ncm", "max") == 1
    assert complete_from_checkpoint(uri, run.run_id, Checkpoint.from_directory(folder), "val_ncm", "max") == 0
    c = tracking.client(uri)
    assert [(m.step, m.value) for m in c.get_metric_history(run.run_id, "val_ncm")] == [(1, 4.0), (2, 6.0)]
    assert tracking.has_artifact(uri, run.run_id, "checkpoints/best.pt")


# ----------------------------------------------------------------------------- resume rules


def test_a_resume_may_move_the_store_and_raise_trials_but_not_change_the_study():
    from s2study.study.runner import study_changes

    stored = {"name": "s", "trials": 4, "asha": {"max_epochs": 2}, "tracking": {"uri": "http://10.0.0.1:5000"},
              "storage": "s3://b/x", "space": {"lr": {"type": "float", "low": 0.1, "high": 1.0}}}
    same = {**stored, "tracking": {"uri": "http://10.0.0.9:5000"}, "storage": "s3://b/x/"}
    assert study_changes(stored, same) == []
    assert study_changes(stored, {**stored, "trials": 6}) == []
    assert study_changes(stored, {**stored, "trials": 3}) == ["trials (4 -> 3)"]
    assert study_changes(stored, {**stored, "asha": {"max_epochs": 3}}) == ["asha.max_epochs (2 -> 3)"]
    assert study_changes(stored, {**stored, "space": {}}) == [
        "space.lr.high (1.0 -> absent)", "space.lr.low (0.1 -> absent)", "space.lr.type (\"float\" -> absent)"]
    # a setting a newer s2study added is not a change of the study
    assert study_changes(stored, {**stored, "system_metrics": {"interval_s": 15}}) == []


def test_sigterm_is_handled_like_ctrl_c():
    import signal

    from s2study.study.runner import StopSignals, Terminated

    calls = []
    sigterm_before = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with StopSignals() as stop:  # inside Tune's fit: its SIGINT handler does the stopping
            signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGINT] and stop.received == "SIGTERM"
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(Terminated), StopSignals():  # elsewhere: like a KeyboardInterrupt
            signal.raise_signal(signal.SIGTERM)
        assert issubclass(Terminated, KeyboardInterrupt)
        assert signal.getsignal(signal.SIGTERM) == sigterm_before  # restored after the study
    finally:
        signal.signal(signal.SIGINT, previous)
