"""GPUs used and shared safely (issue 14), checked on a CPU machine.

* A study cannot ask for more than one GPU per trial (the trainer uses one device).
* The per-share CUDA memory cap leaves the CUDA context inside the share; the DataLoader
  workers follow the device and the trial's CPU share; the trial's thread pools are its share.
* End to end, on a real Ray instance whose node advertises a fake GPU: a trial that reserved
  ``resources.gpu: 0.5`` but sees no CUDA ends failed at once, once (no ``max_failures``
  retries), with the driver state and torch build as the reason in its MLflow run; a CPU
  trial's run carries the device tags and MLflow's ``system/*`` metrics.

The end-to-end part takes about a minute on 2 cores (one Ray instance, two one-trial studies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import torch
import yaml

from s2study.cli import main as cli_main
from s2study.study.config import StudyConfig, TrackingConfig, load_study
from s2study.study.trainable import (
    CUDA_CONTEXT_ENV,
    context_reserve_bytes,
    cuda_problem,
    gpu_memory_fraction,
    limit_cpu_threads,
    limit_gpu_memory,
)
from s2study.train import MAX_AUTO_WORKERS, loader_workers

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
GIB = 2**30


# --------------------------------------------------------------------------- unit checks


def test_more_than_one_gpu_per_trial_is_refused_at_load(tmp_path, capsys):
    study = yaml.safe_load(SMOKE.read_text())
    study["resources"] = {"cpu": 1, "gpu": 2}
    path = tmp_path / "two-gpus.yaml"
    path.write_text(yaml.safe_dump(study))
    assert cli_main(["run", str(path), "--storage", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}: resources.gpu: must be in [0, 1], got 2; the trainer uses one device" in err
    assert not (tmp_path / "results").exists()  # refused before Ray or anything else started


def test_memory_cap_leaves_the_cuda_context_inside_the_share(monkeypatch):
    monkeypatch.delenv(CUDA_CONTEXT_ENV, raising=False)
    assert context_reserve_bytes() == 1024 * 2**20
    for total in (16 * GIB, 24 * GIB, 80 * GIB, 141 * GIB):
        for share in (0.25, 0.5):
            fraction = gpu_memory_fraction(share, total, context_reserve_bytes())
            assert 0 < fraction < share
            assert context_reserve_bytes() + fraction * total <= share * total + 1
    monkeypatch.setenv(CUDA_CONTEXT_ENV, "512")
    assert context_reserve_bytes() == 512 * 2**20
    if not torch.cuda.is_available():
        assert limit_gpu_memory(0.5) is None  # nothing to cap here


def test_no_cuda_under_a_gpu_reservation_names_driver_state_and_torch_build(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi on it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert cuda_problem(0.0, "auto") is None  # no reservation
    assert cuda_problem(0.5, "cpu") is None  # the CPU asked for explicitly (fake-GPU test clusters)
    if torch.cuda.is_available():
        assert cuda_problem(0.5, "auto") is None
        return
    message = cuda_problem(0.5, "auto")
    assert message.startswith("resources.gpu: 0.5 is reserved for this trial (device: auto) but it sees no CUDA GPU")
    assert "torch.cuda.is_available() is False" in message
    assert "CUDA_VISIBLE_DEVICES=0" in message and "nvidia-smi is absent" in message
    build = "CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    assert f"torch {torch.__version__}" in message and build in message
    assert message.endswith("not retried") and "\n" not in message


def test_dataloader_workers_follow_the_device_and_the_cpu_share():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert loader_workers(None, cuda, threads=4) == 3  # cpu - 1: decoding beside the GPU
    assert loader_workers(None, cuda, threads=1) == 0
    assert loader_workers(None, cuda, threads=64) == MAX_AUTO_WORKERS
    assert loader_workers(None, cpu, threads=4) == 0  # the training threads have the cores
    assert loader_workers(2, cpu, threads=1) == 2 and loader_workers(0, cuda, threads=8) == 0


def test_trial_thread_pools_are_limited_to_its_cpu_share():
    torch_before, cv2_before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        assert limit_cpu_threads(0.5) == 1 and torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
        assert limit_cpu_threads(2.7) == 2 and torch.get_num_threads() == 2 and cv2.getNumThreads() == 2
    finally:
        torch.set_num_threads(torch_before)
        cv2.setNumThreads(cv2_before)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fake_gpu_ray() -> Iterator[str]:
    """A real local Ray instance whose node advertises 2 CPUs and one (fake) GPU."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _study(tmp_path: Path, name: str, *overrides: str) -> StudyConfig:
    cfg = load_study(SMOKE, [f"name={name}", "asha.max_epochs=1", "max_concurrent=1", *overrides],
                     trials=1, cwd=tmp_path)
    return dataclasses.replace(cfg, tracking=TrackingConfig(f"sqlite:///{tmp_path / 'mlflow.db'}", name))


def _trial_runs(uri: str, name: str, parent_run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.mark.e2e
def test_gpu_trial_without_cuda_fails_once_naming_driver_and_build(fake_gpu_ray, tmp_path, capsys):
    from s2study.study.runner import run_study

    cfg = _study(tmp_path, "no-cuda", "base.device=auto", "resources.cpu=1", "resources.gpu=0.5",
                 "failure.max_failures=2", "evaluate.top_n=0")
    lines: list[str] = []
    outcome = run_study(cfg, address=fake_gpu_ray, echo=lines.append)

    (trial,) = outcome.trials
    assert trial.status == "failed" and not outcome.interrupted, "\n".join(lines)
    assert "torch.cuda.is_available() is False" in trial.error
    client, runs = _trial_runs(cfg.tracking.uri, "no-cuda", outcome.parent_run_id)
    (run,) = runs
    tags = run.data.tags
    assert run.info.status == "FAILED" and tags["s2study.status"] == "failed"
    reason = tags["s2study.failure_reason"]
    assert reason == trial.error
    assert reason.startswith("resources.gpu: 0.5 is reserved for this trial (device: auto) but it sees no CUDA GPU")
    assert "CUDA_VISIBLE_DEVICES=0 (set by Ray to the trial's GPU ids)" in reason
    assert "NVIDIA driver: nvidia-smi" in reason
    assert (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
            else f"built for CUDA {torch.version.cuda}") in reason
    assert tags["s2study.device"] == "none" and tags["s2study.torch"] == torch.__version__
    assert not run.data.metrics  # no epoch trained on the CPU under the reservation
    assert (run.info.end_time - run.info.start_time) < 60_000
    # Tune saw no error at all, so it retried nothing: no error file, no reopened attempt
    folder = Path(outcome.experiment_path)
    (trial_dir,) = folder.glob("run_trial_*")
    assert not list(trial_dir.glob("error*")), sorted(p.name for p in trial_dir.iterdir())
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
    progress = capsys.readouterr().out
    assert "ended without an epoch" in progress and "failed 1 of 1" in progress, progress


@pytest.mark.e2e
def test_cpu_trial_run_has_device_tags_and_system_metrics(fake_gpu_ray, tmp_path):
    from s2study.study.runner import run_study

    cfg = _study(tmp_path, "cpu-tags", "resources.cpu=1", "resources.gpu=0", "system_metrics.interval_s=1",
                 "evaluate.top_n=1")
    outcome = run_study(cfg, echo=lambda line: None)

    (trial,) = outcome.trials
    assert trial.status == "finished" and trial.trial_id in outcome.evaluated
    client, (run,) = _trial_runs(cfg.tracking.uri, "cpu-tags", outcome.parent_run_id)
    tags = run.data.tags
    assert tags["s2study.device"] == "cpu" and tags["s2study.gpu_name"] == "none"
    assert tags["s2study.torch"] == torch.__version__ and tags["s2study.cuda"] == (torch.version.cuda or "none")
    assert tags["s2study.cpu_threads"] == "1" and tags["s2study.num_workers"] == "0"
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 for m in cpu), run.data.metrics.keys()
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert len({m.step for m in cpu}) == len(cpu)  # one sample per step, as the UI plots them


@pytest.mark.e2e
def test_a_trial_meeting_a_user_error_fails_once_without_retries(fake_gpu_ray, tmp_path, roadscene):
    from s2study.study.runner import run_study

    data = tmp_path / "RoadScene"
    ids = (roadscene / "splits" / "val.txt").read_text().split()[:3]
    for sub in ("cropinfrared", "crop_LR_visible"):
        (data / sub).mkdir(parents=True)
        for pair_id in ids:
            (data / sub / f"{pair_id}.jpg").write_bytes((roadscene / sub / f"{pair_id}.jpg").read_bytes())
    (data / "cropinfrared" / f"{ids[0]}.jpg").write_bytes(b"")  # found at start, unreadable when trained on
    (data / "splits").mkdir()
    (data / "splits" / "train.txt").write_text(f"{ids[0]}\n")
    (data / "splits" / "val.txt").write_text("\n".join(ids[1:]) + "\n")
    cfg = _study(tmp_path, "user-error", f"base.data.root={data}", "failure.max_failures=2", "evaluate.top_n=0")
    outcome = run_study(cfg, echo=lambda line: None)

    (trial,) = outcome.trials
    assert trial.status == "failed" and "DataError: cannot decode image" in trial.error
    _, (run,) = _trial_runs(cfg.tracking.uri, "user-error", outcome.parent_run_id)
    assert run.info.status == "FAILED" and "the file is empty" in run.data.tags["s2study.failure_reason"]
    (trial_dir,) = Path(outcome.experiment_path).glob("run_trial_*")
    assert not list(trial_dir.glob("error*"))  # Tune saw no error: nothing was retried
