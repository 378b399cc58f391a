"""Durable stores end to end: MLflow on PostgreSQL + S3, Ray storage on S3, heads that come and go.

Real servers on free ports of 127.0.0.1, started here and stopped after the module: a
PostgreSQL cluster (``initdb`` in a temporary folder, ``pg_ctl start``), moto's S3-compatible
server with one bucket, and ``mlflow server --backend-store-uri postgresql://...
--artifacts-destination s3://bucket/mlflow``. Studies run as ``s2study run`` subprocesses
(the smoke study, shrunk with ``--set``) with ``--storage s3://bucket/studies``; pyarrow, boto3
and MLflow's server reach the S3 server through ``AWS_ENDPOINT_URL`` /
``MLFLOW_S3_ENDPOINT_URL``.

- *outage study*: the MLflow server is stopped for 30 s while trials train and started again
  on the same port; every trial must finish, with every epoch in MLflow once, and the
  parent run, the trial runs, the checkpoints and plots must be in PostgreSQL and the bucket.
- *moving study*: SIGTERM to the driver mid-study (what ``ray job stop`` sends): exit 143, no
  run left RUNNING; ``--resume`` goes on and its driver is SIGKILLed; the MLflow server is
  started on another port (a new head) and ``--resume --tracking-uri NEW`` with one trial
  more completes the study under the same parent run, each epoch once; ``s2study report``
  reads it all back from the new address.
- ``--resume`` against a store that lost the runs, with nothing to restore, or with a changed
  study file is refused in one line (exit 2) before anything starts.

Skipped only when the PostgreSQL server binaries cannot be found (``.ci/run`` installs them).
About 7 minutes on 2 cores (measured on 2026-12-02 with other jobs running).
"""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from servers import MlflowServer, free_port, postgres_binaries, postgres_server, s3_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
BUCKET = "bucket"
STORAGE = f"s3://{BUCKET}/studies"
STUDY_TIMEOUT = 900
OUTAGE_S = 30
# epochs of several seconds even on an idle machine: the outage and the signals land mid-study
SHRINK = ("--set", "asha.max_epochs=2", "--set", "base.steps_per_epoch=6")
EPOCH = re.compile(r"\]\s+(\w+) epoch (\d+)/")
ENDED = re.compile(r"\]\s+(\w+) (finished|stopped early)")


# ----------------------------------------------------------------------------- servers


@dataclass
class Stack:
    """The servers, the environment studies run in, and the MLflow server (its port changes)."""

    s3: str
    postgres: str
    mlflow: MlflowServer
    env: dict[str, str]
    folder: Path

    @property
    def uri(self) -> str:
        return self.mlflow.url

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)

    def bucket_keys(self, prefix: str = "") -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3)
        keys, token = [], None
        while True:
            page = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
            keys += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return keys


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
                    "install them (apt-get install postgresql) to run the durable-store tests")
    import boto3

    folder = tmp_path_factory.mktemp("durable")
    with postgres_server(binaries) as pg, s3_server(log=folder / "s3.log") as s3:
        aws = {"AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                   RAY_ADDRESS="local", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **aws)
        env.pop("MLFLOW_TRACKING_URI", None)
        saved = {k: os.environ.get(k) for k in aws}
        os.environ.update(aws)  # boto3 and MLflow's client in this process
        server = MlflowServer(["--backend-store-uri", pg, "--artifacts-destination", f"s3://{BUCKET}/mlflow"],
                              env, log=folder / "mlflow-server.log")
        try:
            server.start()
            yield Stack(s3, pg, server, env, folder)
        finally:
            server.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ----------------------------------------------------------------------------- studies


class Reader(threading.Thread):
    """Collects a subprocess's output lines with the time each arrived."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append((time.time(), line))

    def text(self) -> str:
        return "".join(line for _, line in list(self.lines))


@dataclass
class Driver:
    proc: subprocess.Popen
    reader: Reader
    code: int | None = None

    @property
    def output(self) -> str:
        return self.reader.text()

    def epochs(self, since: float = 0.0) -> list[tuple[str, int]]:
        return [(m[1], int(m[2])) for t, line in list(self.reader.lines) if t >= since and (m := EPOCH.search(line))]

    def wait_for(self, predicate, what: str, timeout: float = STUDY_TIMEOUT) -> None:
        deadline = time.time() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"the study ended (code {self.proc.returncode}) before {what}:\n" \
                                             f"{self.output[-4000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}:\n{self.output[-4000:]}"
            time.sleep(0.5)

    def wait(self, timeout: float = STUDY_TIMEOUT) -> int:
        self.code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return self.code


def start(stack: Stack, *args: str, uri: str | None = None) -> Driver:
    proc = subprocess.Popen(
        [sys.executable, "-m", "s2study", "run", str(SMOKE), "--storage", STORAGE, "--tracking-uri", uri or stack.uri,
         *args], cwd=stack.folder, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    reader = Reader(proc.stdout)
    reader.start()
    return Driver(proc, reader)


def session_pids(sid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def kill_session(sid: int) -> None:
    """SIGKILL what is left of a study started in its own session."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def experiment_runs(stack: Stack, name: str) -> tuple[list, list]:
    """(parent runs, trial runs) of experiment ``name``: active runs only."""
    client = stack.client()
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    parents = [r for r in runs if r.data.tags.get("s2study.role") == "study"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _runs_and_output(stack: Stack, name: str, driver: Driver) -> str:
    """Every run of the experiment (deleted ones too) and the driver's output, for a failure message."""
    from mlflow.entities import ViewType

    client = stack.client()
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL) if exp else []
    rows = [(r.info.run_name, r.info.status, r.info.lifecycle_stage,
             {k: v for k, v in r.data.tags.items() if k.startswith("s2study.") and k != "s2study.sampled"})
            for r in runs]
    return "\n".join(map(str, rows)) + "\n--- output ---\n" + driver.output[-6000:]


def steps(stack: Stack, run_id: str, key: str = "val_ncm") -> list[int]:
    return sorted(m.step for m in stack.client().get_metric_history(run_id, key))


def trials_table(stack: Stack, parent_id: str, tmp_path: Path) -> dict[str, dict[str, str]]:
    """The parent run's ``study/trials.csv`` (Tune's view of every trial), by trial id."""
    path = stack.client().download_artifacts(parent_id, "study/trials.csv", str(tmp_path))
    return {row["trial_id"]: row for row in csv.DictReader(io.StringIO(Path(path).read_text()))}


# ----------------------------------------------------------------------------- outage study


@dataclass
class OutageStudy:
    driver: Driver
    stopped_at: float
    restarted_at: float
    during: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture(scope="module")
def outage(stack) -> OutageStudy:
    """The smoke study (2 trials) with the MLflow server away for 30 s once a trial has reported."""
    driver = start(stack, "--set", "trials=2", *SHRINK)
    try:
        driver.wait_for(lambda: driver.epochs(), "a trial's first epoch")
        stack.mlflow.stop()
        stopped = time.time()
        time.sleep(OUTAGE_S)
        restarted = time.time()
        stack.mlflow.start()  # same port
        driver.wait()
    finally:
        if driver.proc.poll() is None:
            driver.proc.kill()
        kill_session(driver.proc.pid)
    return OutageStudy(driver, stopped, restarted, driver.epochs(since=stopped))


def test_study_completes_through_a_tracking_outage_and_trains_on_meanwhile(outage):
    assert outage.driver.code == 0, outage.driver.output[-4000:]
    # trials kept training while the server was away: their epochs were queued, not waited for
    during = [e for t, line in outage.driver.reader.lines if outage.stopped_at <= t < outage.restarted_at
              and (e := EPOCH.search(line))]
    assert during, f"no epoch was reported during the {OUTAGE_S} s outage:\n{outage.driver.output[-3000:]}"


def test_mlflow_on_postgres_holds_the_parent_and_every_epoch_of_every_trial_once(stack, outage, tmp_path):
    parents, trials = experiment_runs(stack, "smoke")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["s2study.status"] == "finished"
    assert parent.data.tags["s2study.storage"] == f"{STORAGE}/smoke" and parent.data.tags["s2study.study"] == "smoke"
    tune_view = trials_table(stack, parent.info.run_id, tmp_path)
    ids = [r.data.tags["s2study.trial_id"] for r in trials]
    assert len(ids) == len(set(ids)) == 2 and set(ids) == set(tune_view), _runs_and_output(stack, "smoke", outage.driver)
    for run in trials:
        trial = tune_view[run.data.tags["s2study.trial_id"]]
        assert run.info.status == "FINISHED", (run.info.run_name, run.data.tags.get("s2study.failure_reason"))
        assert run.data.tags["s2study.status"] == trial["status"] in ("finished", "stopped_early")
        n = int(trial["epochs"])
        for key in ("val_ncm", "val_nc", "loss/total", "best_val_ncm"):
            assert steps(stack, run.info.run_id, key) == list(range(1, n + 1)), (
                run.info.run_name, key, _runs_and_output(stack, "smoke", outage.driver))
    assert not [r for r in parents + trials if r.info.status == "RUNNING"]


def test_checkpoints_plots_and_study_state_are_in_the_bucket(stack, outage):
    parents, trials = experiment_runs(stack, "smoke")
    keys = stack.bucket_keys()
    artifacts = [k for k in keys if k.startswith("mlflow/")]
    for run in trials:  # each trial's best weights, uploaded by the MLflow server into S3
        assert any(k.endswith(f"/{run.info.run_id}/artifacts/checkpoints/best.pt") for k in artifacts), (
            run.info.run_name, [k for k in artifacts if run.info.run_id in k],
            _runs_and_output(stack, "smoke", outage.driver))
    best = parents[0].data.tags["s2study.best_run_id"]
    for name in ("plots/cmr_curve.png", "plots/ncm_curve.png", "eval/"):
        assert any(f"/{best}/artifacts/{name}" in k for k in artifacts), name
    assert any(k.endswith(f"/{parents[0].info.run_id}/artifacts/study/trials.csv") for k in artifacts)
    ray_state = [k for k in keys if k.startswith("studies/smoke/")]
    assert "studies/smoke/s2study_study.json" in ray_state
    assert any(re.search(r"studies/smoke/experiment_state-.*\.json$", k) for k in ray_state)
    assert any(re.search(r"/checkpoint_\d+/checkpoint\.pt$", k) for k in ray_state)


# ----------------------------------------------------------------------------- refusals


def _cli(stack: Stack, *args: str, uri: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "s2study", "run", str(SMOKE), "--tracking-uri", uri or stack.uri, *args],
        cwd=stack.folder, env=stack.env, capture_output=True, text=True, timeout=300, check=False)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("s2study: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "study smoke:" not in proc.stdout  # no trial started
    return lines[0]


def test_resume_refuses_a_store_without_the_study_and_a_changed_study(stack, outage, tmp_path):
    common = ("--storage", STORAGE, "--set", "trials=2", *SHRINK, "--resume")
    empty = _one_line_error(_cli(stack, *common, uri=f"sqlite:///{tmp_path / 'other.db'}"))
    assert "holds no run of study 'smoke'" in empty and f"{STORAGE}/smoke" in empty

    # a store with the parent run (found by its tags) but without the trial runs Tune recorded
    from s2study.study import tracking

    lost_uri = f"sqlite:///{tmp_path / 'lost.db'}"
    exp = tracking.ensure_experiment(lost_uri, "smoke")
    tracking.start_study_run(lost_uri, exp, "smoke", {}, tags={tracking.TAG_STORAGE: f"{STORAGE}/smoke"})
    lost = _one_line_error(_cli(stack, *common, uri=lost_uri))
    assert "lacks the MLflow runs of 2 trial(s)" in lost

    changed = _one_line_error(_cli(stack, *common, "--set", "asha.max_epochs=3", "--set", "trials=1"))
    assert "asha.max_epochs (2 -> 3)" in changed and "trials (2 -> 1)" in changed and "only trials may be raised" in changed

    nothing = _one_line_error(_cli(stack, "--storage", f"s3://{BUCKET}/elsewhere", "--resume"))
    assert "nothing to resume at s3://bucket/elsewhere/smoke" in nothing


# ----------------------------------------------------------------------------- a study that moves


@pytest.mark.timeout(2400)  # three drivers of one study, each starting Ray
def test_sigterm_then_a_killed_driver_then_a_new_head_and_the_study_completes(stack, outage, tmp_path):
    name = "moving"
    args = ("--set", f"name={name}", "--set", "trials=2", "--set", "max_concurrent=2", *SHRINK)

    # 1. SIGTERM (ray job stop) once a trial has reported: a clean, resumable stop
    first = start(stack, *args)
    try:
        first.wait_for(lambda: first.epochs(), "a trial's first epoch")
        os.kill(first.proc.pid, signal.SIGTERM)
        code = first.wait(timeout=300)
        deadline = time.time() + 60  # Ray's own processes may take a moment after the driver
        while session_pids(first.proc.pid) and time.time() < deadline:
            time.sleep(1.0)
        left = session_pids(first.proc.pid)
    finally:
        kill_session(first.proc.pid)
    assert code == 143, first.output[-4000:]
    assert left == [], f"processes left after SIGTERM: {left}"
    assert "--resume" in first.output
    parents, trials = experiment_runs(stack, name)
    assert len(parents) == 1 and parents[0].info.status == "KILLED", [p.info.status for p in parents]
    assert trials and not [r for r in parents + trials if r.info.status == "RUNNING"], [
        (r.info.run_name, r.info.status) for r in trials]
    parent_id = parents[0].info.run_id

    # 2. resume, and SIGKILL its whole session once it trains again (a head lost with its driver)
    second = start(stack, *args, "--resume")
    try:
        second.wait_for(lambda: "resuming study moving" in second.output and second.epochs(), "the resumed study")
        os.killpg(second.proc.pid, signal.SIGKILL)
        second.wait(timeout=60)
    finally:
        kill_session(second.proc.pid)
    assert f"resuming study {name} (MLflow run {parent_id})" in second.output

    # 3. a new head: the tracking server on another port, same PostgreSQL and bucket
    old_uri = stack.uri
    stack.mlflow.stop()
    stack.mlflow.start(port=free_port())
    assert stack.uri != old_uri
    last = start(stack, *args[:2], "--set", "trials=3", *args[4:], "--resume")  # one trial more
    try:
        code = last.wait()
    finally:
        kill_session(last.proc.pid)
    assert code == 0, last.output[-4000:]
    assert f"resuming study {name} (MLflow run {parent_id}; its tracking store was {old_uri})" in last.output
    assert f"extending study {name} from 2 to 3 trials" in last.output

    parents, trials = experiment_runs(stack, name)
    assert [p.info.run_id for p in parents] == [parent_id] and parents[0].info.status == "FINISHED"
    tune_view = trials_table(stack, parent_id, tmp_path)
    ids = [r.data.tags["s2study.trial_id"] for r in trials]
    assert len(ids) == len(set(ids)) == 3 and set(ids) == set(tune_view), (ids, sorted(tune_view))
    for run in trials:
        trial = tune_view[run.data.tags["s2study.trial_id"]]
        assert run.info.status == "FINISHED", (run.info.run_name, run.data.tags.get("s2study.failure_reason"))
        assert run.data.tags["s2study.status"] == trial["status"] in ("finished", "stopped_early")
        for key in ("val_ncm", "loss/total"):
            assert steps(stack, run.info.run_id, key) == list(range(1, int(trial["epochs"]) + 1)), run.info.run_name
    assert not [r for r in parents + trials if r.info.status == "RUNNING"]

    report = subprocess.run([sys.executable, "-m", "s2study", "report", name, "--tracking-uri", stack.uri],
                            env=stack.env, capture_output=True, text=True, timeout=300, check=False)
    assert report.returncode == 0, report.stderr[-2000:]
    rows = [line for line in report.stdout.splitlines() if re.match(r"^\s+\d+\s+run_trial_", line)]
    assert len(rows) == 3, report.stdout
    assert "TABLE II: number of correct matches" in report.stdout
