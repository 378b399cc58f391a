"""Faults lose nothing: diverging trials, killed trial workers, Ctrl-C, kills during writes.

Real tiny studies (``s2study run`` as a subprocess, Ray Tune + Optuna + MLflow on CPU, the
shared RoadScene pairs), built from ``search_spaces/smoke.yaml``'s base:

- *fault study*: a grid over ``lr`` in {1e-3, 1e30}. The 1e30 trial really diverges (its first
  Adam step sends the weights to ~1e30, the next forward pass overflows to NaN); it must fail
  with ``TrainingDiverged`` as its reason, in Tune and as the FAILED MLflow run's
  ``s2study.failure_reason``. The healthy trial's Ray worker is SIGKILLed (by pid, found from
  its working directory, in the driver's session only) during epoch 2, once Tune holds its
  epoch-1 checkpoint; ``failure.max_failures`` must restart it from that checkpoint, so its
  Tune results and its MLflow metric history hold epochs 1..N once each.
- *Ctrl-C study*: SIGINT to the driver's process group (what a terminal sends) once a trial
  has reported; the driver must exit 130 with no MLflow run left RUNNING, leave no process
  behind, and ``s2study run --resume`` must complete the study. (The driver SIGKILL +
  ``--resume`` case lives in tests/test_e2e_study.py.)

Without Ray: the trainer's non-finite loss guard across epochs, and atomic checkpoint /
history writes under SIGKILL at random moments.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from s2study.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
STUDY_TIMEOUT = 1200


# ----------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    # RAY_ADDRESS=local: a fresh Ray instance, never a `ray start` cluster found on this machine
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.update(PYTHONUNBUFFERED="1", RAY_ADDRESS="local")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state ppid pgrp session ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def kill_session(sid: int) -> None:
    """SIGKILL what is left of a study started in its own session (test cleanup)."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def trial_workers(sid: int, trial_dir_name: str) -> list[int]:
    """Pids of the Ray workers running the trainable of one trial, in session ``sid`` only.

    Tune runs a function trainable in a worker titled ``ray::ImplicitFunc...`` whose working
    directory is ``.../working_dirs/<trial dir name>``.
    """
    found = []
    for pid in session_pids(sid):
        try:
            title = (
                Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            )
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if title.startswith("ray::ImplicitFunc") and Path(cwd).name == trial_dir_name:
            found.append(pid)
    return found


def study_file(folder: Path, name: str, **changes) -> Path:
    """The smoke study's base with ``changes`` on top, written to ``folder/<name>.yaml``."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(
        name=name, trials=2, max_concurrent=2, evaluate={"top_n": 0}, failure={"max_failures": 1}
    )
    data.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Driver:
    """An ``s2study run`` started in its own session, its output in files."""

    proc: subprocess.Popen
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = STUDY_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)


def start_study(folder: Path, study: Path, *extra: str, log_name: str = "driver.log") -> Driver:
    log = folder / log_name
    with log.open("w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "s2study",
                "run",
                str(study),
                "--storage",
                str(folder / "results"),
                "--tracking-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                *extra,
            ],
            cwd=folder,
            env=_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Driver(proc, log)


def wait_for(predicate, timeout: float, what: str, driver: Driver, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if driver.proc.poll() is not None:
            pytest.fail(
                f"the study ended (code {driver.proc.returncode}) before {what}:\n"
                f"{driver.output[-4000:]}"
            )
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{driver.output[-4000:]}")


def mlflow_runs(uri: str, experiment: str) -> tuple[object, list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def children(runs: list) -> list:
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def steps(client, run_id: str, key: str = "val_ncm") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def tune_epochs(trial_dir: Path) -> list[int]:
    """The ``epoch`` of every result Tune recorded for a trial, in order."""
    lines = (
        (trial_dir / "result.json").read_text().splitlines()
        if (trial_dir / "result.json").is_file()
        else []
    )
    return [int(json.loads(line)["epoch"]) for line in lines if line.strip()]


# ----------------------------------------------------------------------------- fault study


@dataclass
class FaultStudy:
    folder: Path
    name: str
    code: int
    output: str
    killed_trial_dir: Path
    killed_pids: list[int]

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.folder / 'mlflow.db'}"

    def trial_dirs(self) -> list[Path]:
        return sorted(
            p for p in (self.folder / "results" / self.name).glob("run_trial_*") if p.is_dir()
        )


@pytest.fixture(scope="module")
def fault_study(tmp_path_factory) -> FaultStudy:
    folder = tmp_path_factory.mktemp("faults")
    name = f"faults-{uuid.uuid4().hex[:8]}"
    study = study_file(
        folder,
        name,
        space={"lr": {"type": "categorical", "choices": [1.0e-3, 1.0e30]}},
        sampler={"name": "grid", "seed": 0},
        asha={"enabled": False, "max_epochs": 3},
    )
    raw = yaml.safe_load(study.read_text())
    raw["base"]["max_nonfinite_steps"] = 1  # fail at the first non-finite loss
    # epochs long enough (seconds, even on an idle machine) for the kill to land inside epoch 2
    raw["base"]["steps_per_epoch"] = 30
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    driver = start_study(folder, study)
    sid = driver.proc.pid
    try:
        exp = folder / "results" / name
        first_ckpt = wait_for(
            lambda: sorted(exp.glob("run_trial_*/checkpoint_000000/checkpoint.pt")),
            STUDY_TIMEOUT,
            "a trial's epoch-1 checkpoint",
            driver,
        )[0]
        trial_dir = first_ckpt.parent.parent
        time.sleep(1.0)  # into epoch 2 (30 steps: several seconds even on an idle machine)
        assert not (trial_dir / "checkpoint_000001").exists(), "epoch 2 ended before the kill"
        pids = wait_for(
            lambda: trial_workers(sid, trial_dir.name), 60, "the trial's Ray worker", driver
        )
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        code = driver.wait()
    finally:
        if driver.proc.poll() is None:
            driver.proc.kill()
        kill_session(sid)
    return FaultStudy(folder, name, code, driver.output, trial_dir, pids)


@pytest.mark.e2e
def test_fault_study_completes(fault_study):
    assert fault_study.code == 0, fault_study.output[-4000:]
    assert f"study {fault_study.name}: 2 trials" in fault_study.output


@pytest.mark.e2e
def test_diverging_trial_fails_with_that_reason_in_tune_and_mlflow(fault_study):
    _, runs = mlflow_runs(fault_study.uri, fault_study.name)
    diverged = [r for r in children(runs) if float(r.data.params.get("lr", 0)) > 1]
    assert len(diverged) == 1, [r.data.params.get("lr") for r in children(runs)]
    run = diverged[0]
    reason = run.data.tags.get("s2study.failure_reason", "")
    assert run.info.status == "FAILED" and run.data.tags.get("s2study.status") == "failed", (
        run.info.status
    )
    assert "TrainingDiverged" in reason and re.search(r"\b(nan|inf)\b", reason), reason
    assert "TrainingDiverged" in fault_study.output


@pytest.mark.e2e
def test_killed_trial_resumes_from_its_checkpoint_and_loses_no_epoch(fault_study):
    trial_dir = fault_study.killed_trial_dir
    assert fault_study.killed_pids, "no worker was killed"
    assert all(_stat(p) is None or _stat(p)[0] == "Z" for p in fault_study.killed_pids)
    # the killed attempt failed (Tune wrote its error) and the retry restored epoch 1's checkpoint
    assert (trial_dir / "error.txt").is_file() or (trial_dir / "error.pkl").is_file(), sorted(
        os.listdir(trial_dir)
    )
    restored = re.escape(f"{trial_dir.name}/checkpoint_000000")
    assert re.search(rf"Restored on .* from checkpoint: .*{restored}", fault_study.output), (
        "not restored"
    )
    # Tune rewrites the trial's result.json from its last synced copy when the trial restarts,
    # which can drop epoch 1's row; the retry itself must run epochs 2 and 3 only (no restart
    # from scratch). The checkpoint history and MLflow below are the complete record.
    assert tune_epochs(trial_dir) in ([1, 2, 3], [2, 3]), "restarted from scratch or lost an epoch"
    ckpt = max(trial_dir.glob("checkpoint_*/checkpoint.pt"))
    assert [int(h["epoch"]) for h in load_checkpoint(ckpt)["history"]] == [1, 2, 3]

    client, runs = mlflow_runs(fault_study.uri, fault_study.name)
    trial_id = re.match(r"run_trial_([0-9a-f]+)_", trial_dir.name).group(1)
    mine = [r for r in children(runs) if r.data.tags.get("s2study.trial_id") == trial_id]
    assert len(mine) == 1, "the restarted trial opened a second MLflow run"
    run = mine[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("s2study.status") == "finished"
    for key in ("val_ncm", "val_nc", "loss/total", "best_val_ncm"):
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key


@pytest.mark.e2e
def test_fault_study_leaves_no_run_running_and_one_run_per_trial(fault_study):
    _, runs = mlflow_runs(fault_study.uri, fault_study.name)
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    trial_ids = [r.data.tags.get("s2study.trial_id") for r in children(runs)]
    assert len(trial_ids) == 2 and len(set(trial_ids)) == 2


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.mark.e2e
def test_ctrl_c_stops_cleanly_and_resume_completes(tmp_path):
    name = f"ctrlc-{uuid.uuid4().hex[:8]}"
    study = study_file(
        tmp_path,
        name,
        asha={"enabled": False, "max_epochs": 2},
        sampler={"name": "random", "seed": 0},
    )
    raw = yaml.safe_load(study.read_text())
    raw["base"]["steps_per_epoch"] = 10  # still running when Ctrl-C comes, even on an idle machine
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver = start_study(tmp_path, study)
    sid = driver.proc.pid
    try:

        def reported():
            client, runs = mlflow_runs(uri, name)
            return any(steps(client, r.info.run_id) for r in children(runs))

        wait_for(reported, STUDY_TIMEOUT, "a trial's first epoch in MLflow", driver, poll=2.0)
        t0 = time.monotonic()
        os.killpg(driver.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        code = driver.wait(timeout=300)
        stop_s = time.monotonic() - t0
        deadline = time.monotonic() + 60  # Ray's own processes may take a moment after the driver
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(1.0)
    finally:
        if driver.proc.poll() is None:
            driver.proc.kill()
        left = session_pids(sid)
        kill_session(sid)
    out = driver.output
    assert code == 130, out[-4000:]
    assert left == [], f"processes left after Ctrl-C: {left}"
    assert "s2study run" in out and "--resume" in out, "the driver should say how to continue"
    assert "Tuner.restore" not in out, "the CLI's resume command, not Tune's Python one"
    client, runs = mlflow_runs(uri, name)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"], [
        (r.info.run_name, r.info.status) for r in runs
    ]
    parent = [r for r in runs if r.data.tags.get("s2study.role") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "KILLED"
    print(f"\nCtrl-C: driver exited {code} after {stop_s:.1f}s")

    resumed = start_study(tmp_path, study, "--resume", log_name="resume.log")
    try:
        code = resumed.wait()
    finally:
        if resumed.proc.poll() is None:
            resumed.proc.kill()
        kill_session(resumed.proc.pid)
    assert code == 0, resumed.output[-4000:]
    client, runs = mlflow_runs(uri, name)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    kids = children(runs)
    assert len({r.data.tags["s2study.trial_id"] for r in kids}) == len(kids) == 2
    for run in kids:
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        assert steps(client, run.info.run_id) == [1, 2], run.info.run_name
    assert [r.info.status for r in runs if r.data.tags.get("s2study.role") == "study"] == [
        "FINISHED"
    ]


# ----------------------------------------------------------------------------- trainer


@pytest.mark.slow
def test_loss_turning_nan_fails_the_run_even_across_epochs(tmp_path, shared_data):
    """lr = 1e30 with 2 steps per epoch: after step 1 every loss is NaN; with
    ``max_nonfinite_steps: 3`` the run must raise TrainingDiverged (at epoch 2), not train on
    NaN weights or crash elsewhere."""
    from s2study.config.load import load_train_config
    from s2study.errors import TrainingDiverged
    from s2study.train import train

    cfg = load_train_config(
        "r2d2-roadscene",
        [
            "lr=1.0e+30",
            "steps_per_epoch=2",
            "epochs=3",
            "max_nonfinite_steps=3",
            "batch_size=1",
            "crop_size=64",
            "val_k=64",
            "device=cpu",
            "precision=fp32",
            "data.max_train_pairs=2",
            "data.max_val_pairs=1",
            "data.val_max_size=128",
        ],
    )
    epochs_reported = []
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf)"):
        train(
            cfg,
            out_dir=tmp_path,
            report=lambda m, p: epochs_reported.append(int(m["epoch"])),
            progress=False,
        )
    assert epochs_reported == [1], epochs_reported


# ----------------------------------------------------------------------------- atomic writes


WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from s2study.checkpoint import atomic_write_bytes, save_checkpoint
    folder, epoch = Path(sys.argv[1]), int(sys.argv[2])
    while True:
        weights = {"w": torch.full((2048, 2048), float(epoch))}  # 16 MiB: a write takes a while
        payload = {"method": {"name": "r2d2", "params": {}}, "model": weights, "epoch": epoch}
        save_checkpoint(folder / "last.pt", payload)
        history = [{"epoch": e} for e in range(1, epoch + 1)]
        atomic_write_bytes(folder / "history.json", lambda f: f.write(json.dumps(history).encode()))
        print(epoch, flush=True)
        epoch += 1
""")


@pytest.mark.slow
def test_checkpoint_and_history_survive_sigkill_at_random_moments(tmp_path):
    rng = random.Random(7)
    kills, epoch = 8, 1
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(epoch)],
            stdout=subprocess.PIPE,
            text=True,
        )
        first = proc.stdout.readline()  # one full write done: the files exist
        assert first.strip() == str(epoch), first
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        printed = [int(x) for x in [first, *proc.stdout.read().split()] if str(x).strip()]
        proc.wait()
        ckpt = load_checkpoint(tmp_path / "last.pt")  # never a torn file
        last = int(ckpt["epoch"])
        assert printed[-1] <= last <= printed[-1] + 1, (printed[-1], last)
        assert float(ckpt["model"]["w"].min()) == float(ckpt["model"]["w"].max()) == last
        history = json.loads((tmp_path / "history.json").read_text())
        assert printed[-1] <= len(history) <= printed[-1] + 1
        assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
        epoch = last + 1
    leftovers = sorted(p.name for p in tmp_path.glob(".*.tmp"))
    print(
        f"\n{kills} SIGKILLs, last epoch {epoch - 1}; temporary files left behind: {len(leftovers)}"
    )
