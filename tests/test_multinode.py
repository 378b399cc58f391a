"""Multi-node acceptance: a real study on a real multi-node Ray cluster on this machine.

``ray.cluster_utils.Cluster`` starts a head node that offers no CPU (trials cannot run there)
and worker nodes with 2 CPUs and one (fake) GPU, each on its own address (127.0.0.2, ...), so
every Tune result row's ``node_ip`` names the node that produced it. A real ``mlflow server``
on this machine's network address is the tracking store, and Tune's storage is a pyarrow
``SubTreeFileSystem`` with a ``bucket/prefix`` path, standing in for S3 (an ``s3://`` URI
cannot resolve offline). The study is the smoke study (R2D2 from the official weights on real
RoadScene pairs) shrunk to 3 trials asking for {cpu: 1, gpu: 0.5}.

* Worker nodes are users' nodes: each is a ``ray start`` of its own, with its own ``HOME``,
  cache and working folder, no ``S2STUDY_*`` variables and ``../shared`` hidden (its own mount
  namespace with an empty tmpfs there), so data and weights reach it only through the
  resolver, from a mirror on this machine (``S2STUDY_MIRROR``), as a fresh cloud node's would
  from the public sources.
* The node-local stores a multi-node study must refuse (a sqlite tracking URI, a loopback
  server, a local storage folder) are refused before any trial starts.
* Every trial runs on the GPU worker; its experiment state and checkpoints are in the
  SubTree store; MLflow holds the parent run and one complete child run per trial.
* A worker node is removed while its trials train: they fail and are retried on a new worker
  (``failure.max_failures``), from their last checkpoint where they had one; each trial still
  has one MLflow run with metric steps 1..n.

About 3 minutes on 2 idle cores (one cluster for the module, three worker nodes in turn, an MLflow
server and two small studies).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs
import pytest
import ray
from mirror import FileServer, build_mirror, hidden_shared, user_env
from mlflow import MlflowClient
from ray.cluster_utils import Cluster
from servers import mlflow_server

from s2study.errors import DataError, EnvironmentProblem
from s2study.study.config import StudyConfig, TrackingConfig, load_study
from s2study.study.runner import STATE_FILE, run_study

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
TRIALS = 3
TRIAL_RESOURCES = ["resources.cpu=1", "resources.gpu=0.5", "max_concurrent=2"]
WORKER = {"num_cpus": 2, "num_gpus": 1}  # the GPU is fake: trials train on the CPU (device: cpu)
WORKER_IPS = ("127.0.0.2", "127.0.0.3")
PREFIX = "bucket/studies"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> Iterator[str]:
    """A real ``mlflow server`` reached at this machine's network address, as cluster nodes would."""
    folder = tmp_path_factory.mktemp("mlflow")
    host, port = ray.util.get_node_ip_address(), _free_port()
    assert not ipaddress.ip_address(host).is_loopback, "a multi-node study needs a network address, not loopback"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    # 0.0.0.0 so that the loopback URI reaches it too (and is refused for what it is)
    options = ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "0.0.0.0", "--port", str(port),
               "--allowed-hosts", f"{host}:{port},127.0.0.1:{port}"]
    with mlflow_server(options, f"http://{host}:{port}", env, cwd=folder) as uri:
        yield uri


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, roadscene, official_r2d2) -> Iterator[FileServer]:
    folder = build_mirror(tmp_path_factory.mktemp("mirror"), roadscene, {"r2d2_WASF_N16.pt": official_r2d2})
    with FileServer(folder) as srv:
        yield srv


class IsolatedWorker:
    """A worker node started with ``ray start`` where ``../shared`` is hidden, with its own
    ``HOME`` (so its own ``~/.cache/s2study``) and working folder, and the mirror's URL."""

    def __init__(self, address: str, ip: str, folder: Path, mirror_url: str) -> None:
        self.ip, self.home = ip, folder / "home"
        self.home.mkdir(parents=True)
        command = ["ray", "start", f"--address={address}", f"--node-ip-address={ip}", "--block",
                   f"--num-cpus={WORKER['num_cpus']}", f"--num-gpus={WORKER['num_gpus']}"]
        self.proc = subprocess.Popen(hidden_shared(command), cwd=self.home, start_new_session=True,
                                     env=user_env(self.home, S2STUDY_MIRROR=mirror_url),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not any(n["Alive"] and n["NodeManagerAddress"] == ip for n in ray.nodes()):
            assert self.proc.poll() is None, "the worker's ray start exited"
            assert time.time() < deadline, f"worker {ip} did not join the cluster"
            time.sleep(0.5)

    @property
    def cache(self) -> Path:
        return self.home / ".cache" / "s2study"

    def kill(self) -> None:
        """SIGKILL every process of the node (its raylet and trial workers name its address)."""
        import psutil

        for p in psutil.process_iter(["cmdline"]):
            if any(self.ip in part for part in p.info["cmdline"] or []):
                p.kill()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster(mirror, tmp_path_factory) -> Iterator[tuple[Cluster, list[IsolatedWorker]]]:
    """A head node with no CPU (so no trial fits there) and one isolated GPU worker at 127.0.0.2,
    shared by the tests of this module (the failover test, last, replaces the worker)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers: list[IsolatedWorker] = []
    try:
        ray.init(address=c.address, logging_level="WARNING")
        workers.append(IsolatedWorker(c.address, WORKER_IPS[0], tmp_path_factory.mktemp("node-1"), mirror.url))
        yield c, workers
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for w in workers:
            if w.proc.poll() is None:
                w.kill()
        c.shutdown()


@pytest.fixture
def bucket(tmp_path) -> pyarrow.fs.SubTreeFileSystem:
    """The stand-in object store: ``bucket/studies/...`` lands under ``tmp_path/object-store``."""
    (tmp_path / "object-store").mkdir()
    return pyarrow.fs.SubTreeFileSystem(str(tmp_path / "object-store"), pyarrow.fs.LocalFileSystem())


def _study(tmp_path: Path, name: str, uri: str, *overrides: str) -> StudyConfig:
    cfg = load_study(SMOKE, [f"name={name}", *TRIAL_RESOURCES, *overrides], trials=TRIALS, cwd=tmp_path)
    return dataclasses.replace(cfg, storage=PREFIX, tracking=TrackingConfig(uri, name))


def _result_rows(store: Path) -> dict[str, list[dict]]:
    """Tune's result rows per trial id, read from the trial folders in the store."""
    rows: dict[str, list[dict]] = {}
    for path in store.glob("run_trial_*/result.json"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["trial_id"], []).append(row)
    return rows


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _trial_runs(client: MlflowClient, name: str, parent_run_id: str):
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`s2study.role` = 'study'")
    assert parent.info.run_id == parent_run_id and parent.info.status == "FINISHED"
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_node_local_stores_are_refused_before_any_trial(cluster, tracking_uri, bucket, tmp_path):
    cluster, _ = cluster
    loopback = tracking_uri.replace(ray.util.get_node_ip_address(), "127.0.0.1")
    db = tmp_path / "mlflow.db"
    cases = [
        (_study(tmp_path, "refused", f"sqlite:///{db}"), bucket, "is a store on one node's disk"),
        (_study(tmp_path, "refused", loopback), bucket, "points at the loopback address"),
        (dataclasses.replace(_study(tmp_path, "refused", tracking_uri), storage=str(tmp_path / "results")), None,
         "is on one node's local disk"),
    ]
    for cfg, fs, problem in cases:
        with pytest.raises(EnvironmentProblem, match=problem) as err:
            run_study(cfg, address=cluster.address, storage_filesystem=fs, echo=lambda line: None)
        assert "2 nodes" in str(err.value)
    assert not db.exists() and not (tmp_path / "results").exists()
    assert not list((tmp_path / "object-store").iterdir())
    assert MlflowClient(tracking_uri).get_experiment_by_name("refused") is None


def test_trials_run_on_the_gpu_worker_with_shared_storage_and_tracking(cluster, tracking_uri, bucket, tmp_path,
                                                                       mirror):
    cluster, (worker,) = cluster
    cfg = _study(tmp_path, "multinode", tracking_uri, "asha.max_epochs=2")
    outcome = run_study(cfg, address=cluster.address, storage_filesystem=bucket, echo=lambda line: None)
    assert not outcome.interrupted and len(outcome.trials) == TRIALS
    assert all(t.status in ("finished", "stopped_early") for t in outcome.trials), outcome.trials

    store = tmp_path / "object-store" / PREFIX / "multinode"
    assert (store / STATE_FILE).is_file() and (store / "tuner.pkl").is_file()
    assert list(store.glob("experiment_state-*.json")) and list(store.glob("searcher-state-*.pkl"))
    rows = _result_rows(store)
    assert set(rows) == {t.trial_id for t in outcome.trials}
    for trial_id, trial_rows in rows.items():
        assert {r["node_ip"] for r in trial_rows} == {WORKER_IPS[0]}, trial_id  # never the head
        (folder,) = store.glob(f"run_trial_{trial_id}_*")
        assert list(folder.glob("checkpoint_*/checkpoint.pt"))

    client = MlflowClient(tracking_uri)
    runs = _trial_runs(client, "multinode", outcome.parent_run_id)
    assert sorted(r.data.tags["s2study.trial_id"] for r in runs) == sorted(rows)
    for run in runs:
        trial_id = run.data.tags["s2study.trial_id"]
        steps = _steps(client, run.info.run_id, "val_ncm")
        assert steps == [r["epoch"] for r in rows[trial_id]] == list(range(1, len(steps) + 1))
        assert run.data.tags["s2study.status"] == ("finished" if len(steps) == 2 else "stopped_early")
        # uploaded from the worker through the server's artifact proxy
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    best = outcome.trials[0]
    assert set(outcome.evaluated) == {best.trial_id}  # the evaluation task ran (on the worker: it needs a GPU)
    assert client.get_run(best.run_id).data.metrics["eval/nc_k256"] > 0
    # the worker resolved data and weights from the mirror into its own cache, once
    assert (worker.cache / "weights" / "r2d2_WASF_N16.pt").is_file()
    assert (worker.cache / "data" / "RoadScene" / "cropinfrared").is_dir()
    assert mirror.gets("RoadScene.zip") >= 1 and mirror.gets("r2d2_WASF_N16.pt") >= 1


def test_a_study_its_worker_cannot_resolve_stops_before_any_trial(cluster, tracking_uri, bucket, tmp_path):
    cluster, _ = cluster
    cfg = _study(tmp_path, "unresolvable", tracking_uri, "base.method.weights=r2d2_WAF_N16")  # not in the mirror
    with pytest.raises(DataError, match=r"on worker node 127\.0\.0\.2: weights r2d2_WAF_N16 is needed but could "
                                        r"not be fetched \(.*r2d2_WAF_N16\.pt: HTTP 404"):
        run_study(cfg, address=cluster.address, storage_filesystem=bucket, echo=lambda line: None)
    assert not list((tmp_path / "object-store").iterdir())  # no trial started, nothing stored
    assert MlflowClient(tracking_uri).get_experiment_by_name("unresolvable") is None


class _StudyThread(threading.Thread):
    """``run_study`` in the background: Ray's node processes can only be started from the main thread."""

    def __init__(self, **kwargs) -> None:
        super().__init__(daemon=True)
        self.kwargs = kwargs
        self.outcome, self.error = None, None

    def run(self) -> None:
        try:
            self.outcome = run_study(**self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            self.error = exc


def test_trials_of_a_killed_worker_resume_from_their_checkpoints_on_another(cluster, tracking_uri, bucket,
                                                                            tmp_path, capsys, mirror):
    cluster, workers = cluster
    # no early stopping: every trial trains 3 epochs, so the kill lands while trials are mid-run
    cfg = _study(tmp_path, "failover", tracking_uri, "asha.max_epochs=3", "asha.enabled=false",
                 "evaluate.top_n=0", "failure.max_failures=2")
    store = tmp_path / "object-store" / PREFIX / "failover"
    (victim,) = workers
    study = _StudyThread(cfg=cfg, address=cluster.address, storage_filesystem=bucket, echo=lambda line: None)
    study.start()
    # the driver's progress line: Tune holds the trial's epoch-1 result and its checkpoint
    output, deadline = "", time.time() + 300
    while not (reported := re.search(r"\]\s+(\w+) epoch 1/3 ", output)):
        assert study.is_alive(), f"the study ended before the worker was killed: {study.error!r}"
        assert time.time() < deadline, "no trial reported an epoch:\n" + output[-3000:]
        time.sleep(0.2)
        output += capsys.readouterr().out
    killed, killed_ms = reported[1], time.time() * 1000
    victim.kill()
    workers[:] = [IsolatedWorker(cluster.address, WORKER_IPS[1], tmp_path / "node-2", mirror.url)]
    study.join(timeout=400)
    assert not study.is_alive(), "the study did not finish after the worker was replaced"
    assert study.error is None, repr(study.error)
    outcome = study.outcome

    assert not outcome.interrupted
    assert [t.status for t in outcome.trials] == ["finished"] * TRIALS, outcome.trials
    # Tune resets a restarted trial's result file to its last upload, so rows the driver had
    # not uploaded before the kill can be missing; rows after the restart are all there.
    rows = _result_rows(store)
    assert {r["node_ip"] for trial_rows in rows.values() for r in trial_rows} <= set(WORKER_IPS)
    (folder,) = store.glob(f"run_trial_{killed}_*")
    assert "Failure # 1" in (folder / "error.txt").read_text()  # it failed with its node ...
    resumed = [r["epoch"] for r in rows[killed] if r["node_ip"] == WORKER_IPS[1]]
    # ... and went on on the new node after its last checkpoint, not from epoch 1
    assert resumed and resumed[0] >= 2 and resumed == list(range(int(resumed[0]), 4)), rows[killed]

    client = MlflowClient(tracking_uri)
    runs = _trial_runs(client, "failover", outcome.parent_run_id)
    assert sorted(r.data.tags["s2study.trial_id"] for r in runs) == sorted(t.trial_id for t in outcome.trials)
    (run,) = [r for r in runs if r.data.tags["s2study.trial_id"] == killed]
    history = sorted(client.get_metric_history(run.info.run_id, "val_ncm"), key=lambda m: m.step)
    assert history[0].timestamp < killed_ms < history[-1].timestamp  # one run, both nodes
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["s2study.status"] == "finished"
        assert _steps(client, run.info.run_id, "val_ncm") == [1, 2, 3]
        assert _steps(client, run.info.run_id, "loss/total") == [1, 2, 3]

