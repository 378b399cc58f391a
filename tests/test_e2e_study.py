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
from typing import Any

import pytest
from mlflow import MlflowClient
from servers import mlflow_server, optuna_dashboard

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
    name: str = "smoke"

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def experiment_id(self) -> str:
        return self.client.get_experiment_by_name(self.name).experiment_id

    def parents(self):
        return self.client.search_runs([self.experiment_id()], "tags.`s2study.role` = 'study'")

    def children(self, repeats: bool = False):
        """The search's trial runs, or with ``repeats`` the repeats' runs."""
        parent = self.parents()[0].info.run_id
        runs = self.client.search_runs([self.experiment_id()], f"tags.mlflow.parentRunId = '{parent}'")
        return [r for r in runs if ("s2study.repeat_of" in r.data.tags) == repeats]


# the first trial's configuration, given in the study (``enqueue``) rather than sampled
ENQUEUED = {"lambda_ssl": 0.4, "ssl.rotation_deg": 30.0}
MODEL = "s2study-smoke"  # the registered model the best trial becomes a version of
REPEATED, SEEDS = 1, 3  # after the search, the best configuration until it has 3 complete runs


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Study:
    folder = tmp_path_factory.mktemp("smoke")
    enqueue = "enqueue=[{" + ", ".join(f"{k}: {v}" for k, v in ENQUEUED.items()) + "}]"
    proc = subprocess.run(_command(folder, "--set", enqueue, "--set", f"register.name={MODEL}",
                                   "--set", f"repeats.top_n={REPEATED}", "--set", f"repeats.seeds={SEEDS}",
                                   "--set", "evaluate.top_n=2", "--set", "evaluate.warp=0"), cwd=folder,
                          env=_env(), check=False,
                          capture_output=True, text=True, timeout=STUDY_TIMEOUT)
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


def _optuna_study(smoke: Study):
    import optuna

    storage = f"sqlite:///{smoke.folder / 'results' / 'smoke' / 'optuna.db'}"
    (parent,) = smoke.parents()
    assert parent.data.tags["s2study.optuna_storage"] == storage
    return optuna.load_study(study_name="smoke", storage=storage)


def test_optuna_storage_holds_each_trials_best_value_and_the_enqueued_configuration_first(smoke):
    import optuna

    study = _optuna_study(smoke)
    assert study.user_attrs["s2study.storage"] == str(smoke.folder / "results" / "smoke")
    assert len(study.trials) == TRIALS
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * TRIALS
    first = min(study.trials, key=lambda t: t.number)
    assert first.params == ENQUEUED
    by_params = {json.dumps(json.loads(r.data.tags["s2study.sampled"]), sort_keys=True): r for r in smoke.children()}
    below_last = 0
    for trial in study.trials:
        run = by_params[json.dumps(trial.params, sort_keys=True)]
        history = [m.value for m in smoke.client.get_metric_history(run.info.run_id, "val_ncm")]
        # what Optuna learns from is the trial's best epoch (what s2study ranks by), not its last
        assert trial.value == max(history) == run.data.metrics["best_val_ncm"], (trial.number, history)
        assert sorted(trial.intermediate_values) == list(range(1, len(history) + 1))
        below_last += max(history) > history[-1]
    print(f"{below_last} of {TRIALS} trials ended below their best epoch")


def test_experiment_opens_on_the_runs_table_and_the_report_gives_importances(smoke):
    assert smoke.client.get_experiment_by_name("smoke").tags["mlflow.experimentKind"] == "custom_model_development"
    text = _report(smoke)
    block = text.split("parameter importances (Optuna, ", 1)[1].split("\n\n", 2)[1]
    names = [line.split()[0] for line in block.splitlines()[2:]]
    assert sorted(names) == sorted(RANGES), block


def test_optuna_dashboard_serves_the_study_with_its_importances(smoke):
    storage = _optuna_study(smoke) and smoke.parents()[0].data.tags["s2study.optuna_storage"]
    with optuna_dashboard(storage, _env()) as base:
        (study,) = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
        assert study["study_name"] == "smoke" and study["directions"] == ["maximize"]
        detail = json.loads(_get(f"{base}/api/studies/{study['study_id']}"))
        assert len(detail["trials"]) == TRIALS
        importances = json.loads(_get(f"{base}/api/studies/{study['study_id']}/param_importances"))
        assert {i["name"] for i in importances["param_importances"][0]} == set(RANGES)


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
        for protocol in ("", "warped/"):  # evaluate.warp: the aligned pairs and their warped copies
            assert 0 <= best_run.data.metrics[f"eval/{protocol}ncm_3px_k{k}"] <= best_run.data.metrics[
                f"eval/{protocol}nc_k{k}"]
            curve = client.get_metric_history(best_run.info.run_id, f"eval/{protocol}cmr_curve_k{k}")
            assert sorted(m.step for m in curve) == list(range(1, 11))
    assert best_run.data.metrics["eval/warped/ncm_3px_k256"] != best_run.data.metrics["eval/ncm_3px_k256"]
    assert best_run.data.tags["s2study.eval_protocols"] == "aligned,warped:0"
    warped = json.loads(Path(client.download_artifacts(best_run.info.run_id, "eval/warped/eval.json",
                                                       str(tmp_path))).read_text())
    assert warped["protocol"] == "warped:0" and warped["num_pairs"] == 3
    report = _report(smoke)
    assert "TABLE II: number of correct matches" in report and "RoadScene warped K=512" in report


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


def test_the_best_trial_is_a_registered_model_version_that_loads_by_its_uri(smoke, tmp_path, monkeypatch,
                                                                           roadscene):
    import cv2
    import numpy as np

    from s2study import load_extractor

    (parent,) = smoke.parents()
    (version,) = smoke.client.search_model_versions(f"name = '{MODEL}'")
    assert int(version.version) == 1 and version.run_id == parent.data.tags["s2study.best_run_id"]
    assert version.tags["s2study.parent_run_id"] == parent.info.run_id and version.tags["s2study.study"] == "smoke"
    assert float(version.tags["val_ncm"]) == parent.data.metrics["best_val_ncm"]
    assert "eval/ncm_3px_k256" in version.tags
    assert parent.data.tags["s2study.registered_model"] == f"models:/{MODEL}/1"
    assert f"registered run_trial_{version.tags['s2study.trial_id']} as models:/{MODEL}/1" in smoke.output

    monkeypatch.setenv("MLFLOW_TRACKING_URI", smoke.uri)
    monkeypatch.setenv("S2STUDY_CACHE", str(tmp_path / "cache"))
    file = Path(smoke.client.download_artifacts(version.run_id, "checkpoints/best.pt", str(tmp_path)))
    image = cv2.imread(str(min((roadscene / "cropinfrared").iterdir())), cv2.IMREAD_GRAYSCALE)[:160, :160]
    by_uri = load_extractor(f"models:/{MODEL}/1")(image, max_keypoints=256)
    by_file = load_extractor(file)(image, max_keypoints=256)
    assert len(by_uri.keypoints) > 0 and np.array_equal(by_uri.keypoints, by_file.keypoints)
    assert np.array_equal(by_uri.descriptors, by_file.descriptors)

    env = dict(_env(), MLFLOW_TRACKING_URI=smoke.uri, S2STUDY_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "s2study", "eval", "--checkpoint", f"models:/{MODEL}/latest",
                           "--data", f"roadscene:{roadscene}", "--split", "val", "--max-pairs", "1", "--k", "256",
                           "--out", str(tmp_path / "eval"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "eval" / "eval.json").is_file()
    missing = subprocess.run([sys.executable, "-m", "s2study", "eval", "--checkpoint", f"models:/{MODEL}/7",
                              "--data", f"roadscene:{roadscene}", "--out", str(tmp_path / "e2")],
                             env=env, capture_output=True, text=True, timeout=300, check=False)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith(
        f"s2study: error: models:/{MODEL}/7: not in the model registry of {smoke.uri}"), missing.stderr[-2000:]


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


def test_repeats_train_the_best_configuration_with_other_seeds_and_report_its_spread(smoke, tmp_path):
    import statistics

    (parent,) = smoke.parents()
    best = max(smoke.children(), key=lambda r: r.data.metrics["best_val_ncm"])
    trial_id, sampled = best.data.tags["s2study.trial_id"], json.loads(best.data.tags["s2study.sampled"])
    repeats = smoke.children(repeats=True)
    own = best.data.tags["s2study.status"] == "finished"  # the search's run counts when it trained every epoch
    assert len(repeats) == (SEEDS - 1 if own else SEEDS), [r.data.tags for r in repeats]
    assert sorted(int(r.data.params["seed"]) for r in repeats) == list(range(1, len(repeats) + 1))
    for run in repeats:
        assert run.data.tags["s2study.repeat_of"] == trial_id and run.info.run_name.startswith("run_repeat_")
        assert {k: v for k, v in json.loads(run.data.tags["s2study.sampled"]).items() if k != "seed"} == sampled
        assert run.data.tags["s2study.status"] == "finished" and run.info.status == "FINISHED"
        assert _history_steps(smoke.client, run.info.run_id, "val_ncm") == list(range(1, MAX_EPOCHS + 1))
        assert "eval/ncm_3px_k256" in run.data.metrics  # every complete run of the configuration is evaluated
    assert len(_optuna_study(smoke).trials) == TRIALS  # the searcher never saw them

    members = [best] * own + repeats
    for figure in ("best_val_ncm", "eval/ncm_3px_k256"):
        values = [m.data.metrics[figure] for m in members]
        name = figure.replace("@", "_")
        assert parent.data.metrics[f"repeats/{trial_id}/{name}_mean"] == pytest.approx(statistics.fmean(values))
        assert parent.data.metrics[f"repeats/{trial_id}/{name}_std"] == pytest.approx(statistics.stdev(values))
    assert parent.data.metrics[f"repeats/{trial_id}/n"] == SEEDS
    values = [m.data.metrics["best_val_ncm"] for m in members]
    row = f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert row in smoke.output  # the summary s2study run prints
    report = subprocess.run([sys.executable, "-m", "s2study", "report", "smoke", "--tracking-uri", smoke.uri,
                             "--lambda-plot", str(tmp_path / "lambda.png")],
                            check=False, capture_output=True, text=True, env=_env(), timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    (line,) = [line for line in report.stdout.splitlines() if line.startswith(best.info.run_name)]
    assert f" {SEEDS} " in line and row in line, report.stdout
    assert (tmp_path / "lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
        runs = [r for r in runs if "s2study.repeat_of" not in {t["key"] for t in r["data"]["tags"]}]
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
RESUME_SETTINGS = ("--set", "base.steps_per_epoch=8", "--set", "trials=5")
RESUME_TRIALS = 5


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
    # the Optuna storage: every Tune trial complete once; those lost with the driver failed
    import optuna

    states = [t.state for t in _optuna_study(study).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == RESUME_TRIALS, states
    assert set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}, states


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


# ----------------------------------------------------------------------------- a study grown from the smoke study


@dataclass
class WarmStudy:
    """``smoke-warm``: warm-started from the smoke study over a narrower space, stopped by a
    wall budget, refused a resume on the spent budget, then resumed with a larger one."""

    study: Study
    fitting: list  # the smoke study's Optuna trials that fit the narrower space
    first: subprocess.CompletedProcess
    stopped: Any  # the parent run after the budget stopped the study
    stopped_children: list
    again: subprocess.CompletedProcess
    last: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def warm(smoke) -> WarmStudy:
    fitting = [t for t in _optuna_study(smoke).trials if t.params["lambda_ssl"] <= 0.6]
    assert fitting and len(fitting) < TRIALS, "the smoke study's lambdas should straddle 0.6"
    # epochs of 20 steps: the study runs well past its 12 s budget even on an idle machine
    settings = ("--set", "name=smoke-warm", "--set", "warm_start.study=smoke", "--set", "space.lambda_ssl.high=0.6",
                "--set", "trials=2", "--set", "base.steps_per_epoch=20", "--set", "evaluate.top_n=0")

    def run(*extra: str, timeout: float = STUDY_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(_command(smoke.folder, *settings, *extra), cwd=smoke.folder, env=_env(), check=False,
                              capture_output=True, text=True, timeout=timeout)

    first = run("--set", "budget.wall=12s")
    study = Study(smoke.folder, smoke.uri, first.stdout + first.stderr, name="smoke-warm")
    assert first.returncode == 0, study.output[-4000:]
    stopped = study.parents()[0]
    stopped_children = study.children()
    again = run("--set", "budget.wall=12s", "--resume", timeout=300)
    last = run("--set", "budget.wall=1h", "--resume")
    assert last.returncode == 0, (last.stdout + last.stderr)[-4000:]
    return WarmStudy(study, fitting, first, stopped, stopped_children, again, last)


def test_a_warm_started_study_holds_the_earlier_trials_that_fit_its_space(warm):
    import optuna

    skipped = TRIALS - len(warm.fitting)
    assert (f"warm start: {len(warm.fitting)} trial(s) of study smoke seed the sampler (skipped {skipped}: "
            f"{skipped} lambda_ssl outside this space)") in warm.study.output
    storage = f"sqlite:///{warm.study.folder / 'results' / 'smoke-warm' / 'optuna.db'}"
    trials = optuna.load_study(study_name="smoke-warm", storage=storage).trials
    seeded = [t for t in trials if "s2study.warm_start_run" in t.user_attrs]
    assert sorted((t.params["lambda_ssl"], t.value) for t in seeded) == sorted(
        (t.params["lambda_ssl"], t.value) for t in warm.fitting)
    new = [t for t in trials if t not in seeded and t.state == optuna.trial.TrialState.COMPLETE]
    assert len(new) == 2 and all(t.params["lambda_ssl"] <= 0.6 for t in new), trials


def test_a_wall_budget_stops_the_study_resumably_and_a_larger_one_finishes_it(warm):
    assert re.search(r"study stopped: wall budget of 12 s spent \(\d\d s\); continue it with: "
                     r"s2study run .*smoke.yaml --resume --set budget.wall=LARGER", warm.study.output), (
        warm.study.output[-3000:])
    assert warm.stopped.info.status == "KILLED" and "wall budget" in warm.stopped.data.tags["s2study.failure_reason"]
    assert warm.stopped.data.metrics["budget/wall_hours_spent"] * 3600 >= 12
    ended = [r for r in warm.stopped_children if r.data.tags["s2study.status"] in ("finished", "stopped_early")]
    assert len(ended) < 2

    # the same budget again: nothing is left of it, refused before anything starts
    again = warm.again
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stderr.strip().splitlines()[-1].startswith("s2study: error: ") and "Traceback" not in again.stderr
    assert "budget: the wall budget of 12 s spent" in again.stderr and "--set budget.wall=" in again.stderr

    (parent,) = warm.study.parents()
    assert parent.info.run_id == warm.stopped.info.run_id and parent.info.status == "FINISHED"
    assert "s2study.failure_reason" not in parent.data.tags  # the budget's reason ended with that attempt
    assert parent.data.metrics["budget/wall_hours_spent"] * 3600 > 12  # counted over both attempts
    runs = warm.study.children()
    assert len(runs) == 2 and all(r.data.tags["s2study.status"] in ("finished", "stopped_early") for r in runs)


def test_a_two_metric_study_reports_a_pareto_front_of_non_dominated_trials(tmp_path):
    """metric: [val_ncm, val_cmr]: Optuna (NSGA-II) is told both at each trial's best epoch by
    val_ncm; the report and the parent run hold the trials no other trial beats in both."""
    import optuna

    settings = ("--set", "name=smoke-pareto", "--set", "metric=[val_ncm, val_cmr]", "--set", "mode=[max, max]",
                "--set", "sampler.name=nsga2", "--set", "sampler.n_startup_trials=null", "--set", "trials=4",
                "--set", "asha.max_epochs=2", "--set", "evaluate.top_n=0")
    folder = tmp_path / "study"
    folder.mkdir()
    proc = subprocess.run(_command(folder, *settings), cwd=folder, env=_env(), check=False,
                          capture_output=True, text=True, timeout=STUDY_TIMEOUT)
    study = Study(folder, f"sqlite:///{folder / 'mlflow.db'}", proc.stdout + proc.stderr, name="smoke-pareto")
    assert proc.returncode == 0, study.output[-4000:]
    runs = study.children()
    values = {r.info.run_name: (r.data.metrics["best_val_ncm"], r.data.metrics["at_best/val_cmr"]) for r in runs}
    for run in runs:  # the val_cmr of the epoch whose val_ncm is the best
        ncm = {m.step: m.value for m in study.client.get_metric_history(run.info.run_id, "val_ncm")}
        cmr = {m.step: m.value for m in study.client.get_metric_history(run.info.run_id, "val_cmr")}
        best_epoch = min(s for s, v in ncm.items() if v == max(ncm.values()))
        assert values[run.info.run_name] == (ncm[best_epoch], cmr[best_epoch])
    storage = f"sqlite:///{folder / 'results' / 'smoke-pareto' / 'optuna.db'}"
    optuna_study = optuna.load_study(study_name="smoke-pareto", storage=storage)
    assert len(optuna_study.directions) == 2
    assert sorted(tuple(t.values) for t in optuna_study.trials) == sorted(values.values())

    front = {n for n, (a, b) in values.items()
             if not any(x >= a and y >= b and (x, y) != (a, b) for x, y in values.values())}
    report = subprocess.run([sys.executable, "-m", "s2study", "report", "smoke-pareto", "--tracking-uri", study.uri],
                            check=False, capture_output=True, text=True, env=_env(), timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    section = report.stdout.split("Pareto front over val_ncm (max), val_cmr (max)")[1].split("\n\n", 2)[1]
    listed = {line.split()[0] for line in section.splitlines()[2:] if line.strip()}
    assert listed == front, report.stdout
    (parent,) = study.parents()
    artifacts = {a.path for a in study.client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pareto_front.png" in artifacts and parent.data.metrics["pareto_front_trials"] == len(front)
    csv_path = Path(study.client.download_artifacts(parent.info.run_id, "study/pareto_front.csv", str(tmp_path)))
    assert {line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]} == front
