"""End to end: ``s2study run search_spaces/smoke.yaml`` for real, then read it all back.

Real Ray Tune (OptunaSearch + ASHAScheduler), real R2D2 training on RoadScene pairs, a
temporary storage folder and a temporary sqlite MLflow store; then a real ``mlflow server``
on the same database, read through its REST API. A second study is killed mid-run (the
driver's whole process group) and resumed with ``--resume``.

One completed smoke study is shared by the assertions (module fixture). On 2 idle cores the
file takes a few minutes; the studies run as subprocesses of the CLI, as a user runs them.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import mlflow_server

from s2study.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
MAX_EPOCHS, TRIALS = 4, 6
RANGES = {"lambda_ssl": (0.0, 1.2), "ssl.rotation_deg": (0.0, 60.0)}
STUDY_TIMEOUT = 900


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _command(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "s2study", "run", str(SMOKE), "--storage", str(folder / "results"),
            "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", *extra]


def _kill_session(sid: int) -> None:
    """End what is left of a killed study: the processes of the session it was started in."""
    groups = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the command: state ppid pgrp session ...
            groups.add(int(fields[2]))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Study:
    folder: Path
    uri: str
    output: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def experiment_id(self) -> str:
        return self.client.get_experiment_by_name("smoke").experiment_id

    def parents(self):
        return self.client.search_runs([self.experiment_id()], "tags.`s2study.role` = 'study'")

    def children(self):
        parent = self.parents()[0].info.run_id
        return self.client.search_runs([self.experiment_id()], f"tags.mlflow.parentRunId = '{parent}'")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Study:
    folder = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run(_command(folder), cwd=folder, env=_env(), check=False, capture_output=True,
                          text=True, timeout=STUDY_TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return Study(folder, f"sqlite:///{folder / 'mlflow.db'}", output)


def _history_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_asha_stopped_some_trials_before_max_epochs(smoke):
    runs = smoke.children()
    epochs = {r.data.tags["s2study.trial_id"]: len(_history_steps(smoke.client, r.info.run_id, "val_ncm"))
              for r in runs}
    stopped = [r for r in runs if r.data.tags["s2study.status"] == "stopped_early"]
    assert len(runs) == TRIALS
    assert stopped, epochs
    assert all(epochs[r.data.tags["s2study.trial_id"]] < MAX_EPOCHS for r in stopped)
    assert max(epochs.values()) == MAX_EPOCHS  # ASHA's top rung: someone trained to the end
    assert re.search(r"stopped early by ASHA after \d epochs", smoke.output)


def test_trial_configs_came_from_the_optuna_study(smoke):
    (state,) = glob.glob(str(smoke.folder / "results" / "smoke" / "searcher-state-*.pkl"))
    with open(state, "rb") as f:
        searcher = pickle.load(f)
    optuna_trials = searcher["_ot_trials"]  # Tune trial id -> Optuna trial
    assert type(searcher["_sampler"]).__name__ == "TPESampler"
    assert len(searcher["_ot_study"].trials) == TRIALS
    sampled = {}
    for run in smoke.children():
        trial_id = run.data.tags["s2study.trial_id"]
        values = json.loads(run.data.tags["s2study.sampled"])
        assert values == optuna_trials[trial_id].params
        for key, (low, high) in RANGES.items():
            assert low <= values[key] <= high
            assert float(run.data.params[key]) == pytest.approx(values[key])
        sampled[trial_id] = tuple(values[k] for k in RANGES)
    assert len(set(sampled.values())) == TRIALS  # every trial got its own values


def test_mlflow_holds_one_parent_and_one_child_per_trial_with_gapless_steps(smoke):
    client = smoke.client
    (parent,) = smoke.parents()
    assert parent.info.status == "FINISHED" and parent.data.tags["s2study.status"] == "finished"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "study")} >= {
        "study/study.yaml", "study/resolved.yaml", "study/space.yaml", "study/trials.csv", "study/best_trial.json"}
    runs = smoke.children()
    assert len({r.data.tags["s2study.trial_id"] for r in runs}) == len(runs) == TRIALS
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"run_trial_{run.data.tags['s2study.trial_id']}"
        assert run.data.params["method.name"] == "r2d2" and run.data.params["crop_size"] == "64"
        steps = _history_steps(client, run.info.run_id, "val_ncm")
        assert steps == list(range(1, len(steps) + 1))
        assert _history_steps(client, run.info.run_id, "loss/total") == steps
        assert run.data.tags["s2study.status"] == ("finished" if len(steps) == MAX_EPOCHS else "stopped_early")
    assert not client.search_runs([smoke.experiment_id()], "attributes.status = 'RUNNING'")


def test_best_trial_has_its_checkpoint_evaluation_and_cmr_plot(smoke, tmp_path):
    client = smoke.client
    (parent,) = smoke.parents()
    best_run = client.get_run(parent.data.tags["s2study.best_run_id"])
    best_value = max(r.data.metrics["best_val_ncm"] for r in smoke.children())
    assert best_run.data.metrics["best_val_ncm"] == best_value
    ckpt = Path(client.download_artifacts(best_run.info.run_id, "checkpoints/best.pt", str(tmp_path)))
    data = load_checkpoint(ckpt)
    assert data["extra"]["mlflow_run_id"] == best_run.info.run_id
    assert data["metrics"]["val_ncm"] == best_value
    png = Path(client.download_artifacts(best_run.info.run_id, "plots/cmr_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in (256, 512):
        assert 0 <= best_run.data.metrics[f"eval/ncm_3px_k{k}"] <= best_run.data.metrics[f"eval/nc_k{k}"]
        curve = client.get_metric_history(best_run.info.run_id, f"eval/cmr_curve_k{k}")
        assert sorted(m.step for m in curve) == list(range(1, 11))
    assert "TABLE II: number of correct matches" in _report(smoke)


def test_each_trials_latest_checkpoint_carries_its_best_weights(smoke):
    """Tune keeps the two most recent checkpoints; the best epoch's weights travel in them."""
    for run in smoke.children():
        values = [m.value for m in smoke.client.get_metric_history(run.info.run_id, "val_ncm")]
        (trial_dir,) = (smoke.folder / "results" / "smoke").glob(f"run_trial_{run.data.tags['s2study.trial_id']}_*")
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        assert len(checkpoints) == min(2, len(values))
        latest = checkpoints[-1]
        assert load_checkpoint(latest / "checkpoint.pt")["epoch"] == len(values)
        best = load_checkpoint(latest / "best.pt")
        assert best["metrics"]["val_ncm"] == max(values) and "optimizer" not in best


def _report(study: Study) -> str:
    proc = subprocess.run([sys.executable, "-m", "s2study", "report", "smoke", "--tracking-uri", study.uri],
                          check=False, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_ranks_the_trials(smoke):
    text = _report(smoke)
    rows = [line.split() for line in text.splitlines() if re.match(r"^\s+\d+\s+run_trial_", line)]
    assert len(rows) == TRIALS
    best = [float(r[4]) for r in rows]
    assert best == sorted(best, reverse=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_mlflow_server_serves_the_study_over_rest(smoke):
    port = _free_port()
    env = dict(_env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    options = ["--backend-store-uri", smoke.uri, "--host", "127.0.0.1", "--port", str(port)]
    with mlflow_server(options, f"http://127.0.0.1:{port}", env) as base:
        exp = json.loads(_get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke"))["experiment"]
        parents = _post(f"{base}/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp["experiment_id"]], "filter": "tags.`s2study.role` = 'study'"})["runs"]
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        runs = _post(f"{base}/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp["experiment_id"]], "filter": f"tags.mlflow.parentRunId = '{parent_id}'",
            "order_by": ["metrics.best_val_ncm DESC"]})["runs"]
        assert len(runs) == TRIALS
        best = runs[0]["info"]["run_id"]
        tags = {t["key"]: t["value"] for t in parents[0]["data"]["tags"]}
        assert tags["s2study.best_run_id"] == best
        history = json.loads(_get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={best}&metric_key=val_ncm"))
        assert sorted(m["step"] for m in history["metrics"]) == list(range(1, len(history["metrics"]) + 1))
        listing = json.loads(_get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={best}&path=plots"))
        assert {f["path"] for f in listing["files"]} >= {"plots/cmr_curve.png", "plots/ncm_curve.png"}
        png = _get(f"{base}/get-artifact?path=plots/cmr_curve.png&run_uuid={best}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


class _Reader(threading.Thread):
    """Collects a subprocess's output lines with the time each arrived."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append((time.time(), line))

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


EPOCH = re.compile(r"\]\s+(\w+) epoch (\d+)/")
ENDED = re.compile(r"\]\s+(\w+) (finished|stopped early)")


# Longer epochs and more trials than the shared smoke run, so that on an idle machine the study
# is still running well after its first trials ended (the smoke study alone can end in 20 s).
RESUME_SETTINGS = ("--set", "base.steps_per_epoch=8", "--set", "trials=8")
RESUME_TRIALS = 8


def _failure(run, folder: Path, output: str) -> str:
    """What to show when a trial did not end well: its tags, Tune's error files, the study's output."""
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("s2study.")}
    errors = "".join(f"\n{p}:\n{p.read_text()[-1500:]}" for p in (folder / "results").rglob("error.txt"))
    return f"{tags}{errors}\n--- output ---\n{output[-4000:]}"


def test_resume_after_killing_the_driver(tmp_path):
    proc = subprocess.Popen(_command(tmp_path, *RESUME_SETTINGS), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    reader = _Reader(proc.stdout)
    reader.start()
    deadline = time.time() + STUDY_TIMEOUT
    try:
        while True:
            reported = {m[1] for _, line in reader.lines if (m := EPOCH.search(line))}
            ended = {m[1]: t for t, line in reader.lines if (m := ENDED.search(line))}
            # Tune snapshots its state at most every 10 s: kill well after a trial ended
            settled = [tid for tid, t in ended.items() if time.time() - t > 15]
            if len(reported) >= 2 and settled and len(ended) < RESUME_TRIALS:
                break
            assert proc.poll() is None, "the study ended before it could be killed:\n" + reader.text()[-3000:]
            assert time.time() < deadline, reader.text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        _kill_session(proc.pid)
    reader.join(timeout=10)
    study = Study(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", reader.text())
    (parent_before,) = study.parents()
    before = {r.data.tags["s2study.trial_id"]: r for r in study.children()}
    histories_before = {tid: _history_steps(study.client, before[tid].info.run_id, "val_ncm") for tid in settled}

    resumed = subprocess.run(_command(tmp_path, *RESUME_SETTINGS, "--resume"), cwd=tmp_path, env=_env(), check=False,
                             capture_output=True, text=True, timeout=STUDY_TIMEOUT)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert "resuming study smoke" in output

    (parent,) = study.parents()
    assert parent.info.run_id == parent_before.info.run_id and parent.info.status == "FINISHED"
    runs = study.children()
    trial_ids = [r.data.tags["s2study.trial_id"] for r in runs]
    assert len(trial_ids) == len(set(trial_ids)) == RESUME_TRIALS
    assert set(settled) <= set(trial_ids)
    for trial_id, run in before.items():  # a trial started after Tune's last snapshot is lost
        if trial_id not in trial_ids:
            assert study.client.get_run(run.info.run_id).info.lifecycle_stage == "deleted"
            assert "lost when the driver died" in output
    for run in runs:
        assert run.info.run_id == before.get(run.data.tags["s2study.trial_id"], run).info.run_id
        steps = _history_steps(study.client, run.info.run_id, "val_ncm")
        assert steps == list(range(1, len(steps) + 1)) and steps
        assert run.data.tags["s2study.status"] in ("finished", "stopped_early"), _failure(run, tmp_path, output)
    assert not study.client.search_runs([study.experiment_id()], "attributes.status = 'RUNNING'")
    for tid in settled:  # trials that had ended before the kill were not rerun
        assert not re.search(rf"\]\s+{tid} epoch", output), output[-3000:]
        assert _history_steps(study.client, before[tid].info.run_id, "val_ncm") == histories_before[tid]


def test_failing_trials_end_failed_with_one_run_each_on_a_non_local_filesystem(tmp_path, monkeypatch):
    """In process, with Tune's storage on a pyarrow SubTreeFileSystem (the s3:// code path)."""
    import pyarrow.fs

    from s2study.study.config import TrackingConfig, load_study
    from s2study.study.runner import STATE_FILE, run_study

    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    cfg = load_study(SMOKE, [f"base.method.weights={broken}", "evaluate.top_n=0"], trials=2, cwd=tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = dataclasses.replace(cfg, storage="bucket/studies", tracking=TrackingConfig(uri, "smoke"))
    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "object-store"), pyarrow.fs.LocalFileSystem())
    (tmp_path / "object-store").mkdir()
    lines: list[str] = []
    outcome = run_study(cfg, storage_filesystem=bucket, echo=lines.append)

    assert [t.status for t in outcome.trials] == ["failed", "failed"] and not outcome.interrupted
    assert (tmp_path / "object-store/bucket/studies/smoke" / STATE_FILE).is_file()
    study = Study(tmp_path, uri, "\n".join(lines))
    runs = study.children()
    assert len(runs) == 2  # failure_config retried each trial once, in its same run
    for run in runs:
        assert run.info.status == "FAILED" and run.data.tags["s2study.status"] == "failed"
        assert "broken.pt" in run.data.tags["s2study.failure_reason"]
    (parent,) = study.parents()
    assert parent.info.run_id == outcome.parent_run_id and parent.info.status == "FINISHED"
    assert not study.client.search_runs([study.experiment_id()], "attributes.status = 'RUNNING'")
